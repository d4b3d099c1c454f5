# MLflow tracking server with the PostgreSQL driver (the official image ships MLflow only).
#   docker build -f docker/mlflow.Dockerfile -t pruning-mlflow:3.17.2 .
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir psycopg2-binary==2.9.13 \
    && useradd --system --uid 10002 --create-home mlflow \
    && mkdir -p /mlartifacts \
    && chown mlflow /mlartifacts
USER 10002
EXPOSE 5000
# The backend store URI (with its password) comes from the environment (MLFLOW_BACKEND_STORE_URI),
# never from the command line or this file.
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "2", "--artifacts-destination", "/mlartifacts"]
