#!/usr/bin/env bash
# Debian packages the platform needs, pinned: python3-venv where python3 lacks ensurepip, Korean fonts for the synthetic data (print and
# handwriting faces, and the sign faces of fonts-woowa-bm that the ko-base recipe holds out) and Tesseract 5 with Korean data (the evaluation baseline); then the handwriting
# faces Debian does not package, from pinned npm tarballs (scripts/install_web_fonts.py, run with
# Debian's python3 and python3-fonttools). Each step does nothing when already done.
set -euo pipefail
PKGS=(
  "fonts-nanum=20200506-1"
  "fonts-nanum-extra=20200506-1"
  "fonts-unfonts-core=1:1.0.2-080608-18"
  "fonts-unfonts-extra=1:1.0.2-080608+dfsg-11"
  "fonts-baekmuk=2.2-13"
  "fonts-alee=13.3"
  "fonts-woowa-bm=20211009-2"
  "fonts-noto-cjk=1:20220127+repack1-1"
  "fontconfig=2.14.1-4"
  "tesseract-ocr=5.3.0-2"
  "tesseract-ocr-kor=1:4.1.0-2"
  "tesseract-ocr-eng=1:4.1.0-2"
  "python3-fonttools=4.38.0-1+deb12u1"
)
# Debian's own python3 makes virtual environments only with python3-venv (ensurepip), and
# `make install` creates one: add it where the interpreter the Makefile uses lacks ensurepip.
if ! "${PYTHON:-python3}" -c 'import ensurepip' >/dev/null 2>&1; then
  PKGS+=("python3-venv=3.11.2-1+b1")
fi
# cleval (the CLEval scores) needs Polygon3, which PyPI has only as source: building it takes a C
# compiler and the interpreter's headers, which slim images and fresh machines lack.
if ! command -v cc >/dev/null 2>&1; then
  PKGS+=("gcc=4:12.2.0-3" "libc6-dev")   # libc6-dev unpinned: it must match the libc6 already there
fi
if ! "${PYTHON:-python3}" -c 'import os, sys, sysconfig; sys.exit(not os.path.isfile(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
  # Debian's own python3 (images' pythons carry their headers). Unpinned, like libc6-dev: it requires
  # exactly the version of python3.11 it ships with, and each Debian security update of python3.11
  # removes the previous one from the archive (a pin here stops the install on every fresh machine).
  PKGS+=("python3.11-dev")
fi
missing=()
for spec in "${PKGS[@]}"; do
  name=${spec%%=*}; want=${spec#"$name"}; want=${want#=}   # an unpinned spec: any installed version
  have=$(dpkg-query -W -f='${db:Status-Abbrev}${Version}' "$name" 2>/dev/null || true)
  # installed whatever is wanted of it (ii, hi: held by apt-mark hold, ri/pi); rc and the rest: missing
  case $have in ?i*) have=${have:3}; have=${have# } ;; *) have="" ;; esac
  if [ -z "$have" ] || { [ -n "$want" ] && [ "$have" != "$want" ]; }; then missing+=("$spec"); fi
done
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if [ ${#missing[@]} -eq 0 ]; then
  echo "system packages: present"
else
  echo "system packages: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fc-cache -f >/dev/null 2>&1 || true
fi
# sudo drops the caller's environment: KOCR_NPM_REGISTRY (an npm mirror) goes as --registry, and
# only when set, since the script takes an empty value as the registry's address.
web_fonts=("$(dirname "$0")/install_web_fonts.py")
[ -z "${KOCR_NPM_REGISTRY:-}" ] || web_fonts+=(--registry "$KOCR_NPM_REGISTRY")
if /usr/bin/python3 "$(dirname "$0")/install_web_fonts.py" --check >/dev/null 2>&1; then
  echo "web fonts: present"   # no sudo (nor its password prompt) when there is nothing to write
else
  $SUDO env -u KOCR_NPM_REGISTRY /usr/bin/python3 "${web_fonts[@]}"   # refreshes fontconfig's cache when it writes
fi
