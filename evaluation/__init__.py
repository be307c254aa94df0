"""End-to-end evaluation, metrics and registry promotion."""
