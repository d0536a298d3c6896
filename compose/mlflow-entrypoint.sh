#!/bin/sh
# Entrypoint of the MLflow image: PGPASSWORD_FILE, AWS_ACCESS_KEY_ID_FILE and
# AWS_SECRET_ACCESS_KEY_FILE name files (compose secrets, Kubernetes Secret volumes) whose
# contents become PGPASSWORD (read by libpq), AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (read
# by boto3); then the command runs. Secrets thus never appear on a command line or in the
# container's configuration. Only these names: other *_FILE variables (SSL_CERT_FILE, …) are
# paths their programs read themselves.
set -eu
for name in PGPASSWORD AWS_ACCESS_KEY_ID AWS_SECRET_ACCESS_KEY; do
    eval "path=\${${name}_FILE:-}"
    [ -n "$path" ] || continue
    if [ ! -r "$path" ]; then
        echo "mlflow-entrypoint: ${name}_FILE=$path is not a readable file" >&2
        exit 1
    fi
    value=$(cat "$path")
    export "$name=$value"
    unset "${name}_FILE"
done
exec "$@"
