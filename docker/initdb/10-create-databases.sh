#!/bin/bash
# Runs once, on the first start of the postgres container (docker-entrypoint-initdb.d):
# one role and one database per server. Passwords come from the container's environment
# (docker/.env) as psql variables, never from this file.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v prefect_pw="$PREFECT_DB_PASSWORD" -v mlflow_pw="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE prefect LOGIN PASSWORD :'prefect_pw';
CREATE DATABASE prefect OWNER prefect;
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_pw';
CREATE DATABASE mlflow OWNER mlflow;
\connect prefect
CREATE EXTENSION IF NOT EXISTS pg_trgm;
SQL
