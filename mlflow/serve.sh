#!/usr/bin/env bash
# The kocr tracking server: `mlflow server` against PostgreSQL (runs, registry and basic-auth users)
# and an S3 bucket (artifacts, proxied by the server). The same command runs in the mlflow/ compose
# stack (copied into the image) and without Docker (`make mlflow-server`, the tests).
#
# Required environment:
#   MLFLOW_BACKEND_STORE_URI        postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB
#   MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/PREFIX
#   MLFLOW_S3_ENDPOINT_URL          http://HOST:PORT of the S3-compatible store (unset for AWS S3)
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password, used only when the user store is empty
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the UI's CSRF tokens; keep it stable across restarts
# Optional (default):
#   MLFLOW_HOST (127.0.0.1)  MLFLOW_PORT (5000)  MLFLOW_WORKERS (1)
#   MLFLOW_ALLOWED_HOSTS     Host headers accepted (localhost and 127.0.0.1, with and without port)
#   MLFLOW_AUTH_ADMIN_USERNAME (admin)  MLFLOW_AUTH_DEFAULT_PERMISSION (READ)
#   MLFLOW_AUTH_DATABASE_URI  where basic-auth keeps its users (MLFLOW_BACKEND_STORE_URI)
#   KOCR_MLFLOW_CONF_DIR      where the generated basic-auth config is written (a new temp dir)
set -euo pipefail

die() { echo "mlflow/serve.sh: $*" >&2; exit 2; }

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION=s3://BUCKET/PREFIX}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (MLflow has no default admin password)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (any long random string)}"

case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql+psycopg2://*) ;;
  postgresql://* | postgres://*)
    die "write postgresql+psycopg2://… (SQLAlchemy 2.1 maps postgresql:// to psycopg 3, which is not installed)" ;;
  *) die "MLFLOW_BACKEND_STORE_URI must be a PostgreSQL URI (postgresql+psycopg2://…), got a different scheme" ;;
esac
case "$MLFLOW_ARTIFACTS_DESTINATION" in
  s3://?*) ;;
  *) die "MLFLOW_ARTIFACTS_DESTINATION must be s3://BUCKET[/PREFIX]" ;;
esac

host=${MLFLOW_HOST:-127.0.0.1}
port=${MLFLOW_PORT:-5000}
allowed_hosts=${MLFLOW_ALLOWED_HOSTS:-localhost,localhost:$port,127.0.0.1,127.0.0.1:$port}
auth_db=${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}

# basic-auth reads its settings from an ini file; its user store goes to PostgreSQL too (tables
# users/experiment_permissions/… and alembic_version_auth, beside the tracking tables), so a
# restart or a new container loses no user. configparser treats % specially: double it.
conf_dir=${KOCR_MLFLOW_CONF_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/kocr-mlflow.XXXXXX")}
mkdir -p "$conf_dir"
umask 077
cat > "$conf_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${auth_db//%/%%}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"
# The job-execution backend (huey workers for server-side jobs) is unused here and costs ~20 s at start.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION=${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}
export MLFLOW_ENABLE_TELEMETRY=${MLFLOW_ENABLE_TELEMETRY:-false}

exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --registry-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  --serve-artifacts \
  --host "$host" \
  --port "$port" \
  --workers "${MLFLOW_WORKERS:-1}" \
  --allowed-hosts "$allowed_hosts" \
  --app-name basic-auth
