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
# --host 0.0.0.0 binds the container's own network interfaces (other containers of the stack reach
# it as http://mlflow:5000); it is not published on the host by itself. The MLflow server has no
# authentication: publish it on loopback only, as docker/compose.yml does ("127.0.0.1:5000:5000"),
# or with `docker run -p 127.0.0.1:5000:5000`, never `-p 5000:5000` (all of the host's interfaces).
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000", "--workers", "2", "--artifacts-destination", "/mlartifacts"]
