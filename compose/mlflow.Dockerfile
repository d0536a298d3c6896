# The MLflow tracking server used as loraplex's adapter registry: MLflow plus the Postgres driver
# (backend store) and boto3 (S3 artifact store). Build from the repository root:
#   docker build -f compose/mlflow.Dockerfile -t loraplex-mlflow:3.17.2 .
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.5

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary==${PSYCOPG2_VERSION}" "boto3==${BOTO3_VERSION}"

COPY compose/container_healthcheck.py /usr/local/bin/loraplex-healthcheck
COPY compose/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint
RUN chmod 0755 /usr/local/bin/loraplex-healthcheck /usr/local/bin/mlflow-entrypoint \
    && useradd --system --uid 10001 --create-home --home-dir /home/mlflow mlflow
USER mlflow
WORKDIR /home/mlflow

EXPOSE 5000
# Flags come from the deployment (docker-compose.yml, k8s/base/mlflow.yaml); MLflow also reads
# MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_WORKERS and
# MLFLOW_SERVER_ALLOWED_HOSTS from the environment, and the entrypoint turns PGPASSWORD_FILE and
# AWS_*_FILE into the variables libpq and boto3 read.
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
