# syntax=docker/dockerfile:1.7
# The MLflow tracking server: the MLflow version pyproject.toml pins with its `auth`
# extra (the basic-auth app), the PostgreSQL driver and boto3 for the S3 artifact
# store. infra/k8s/mlflow.yaml runs it.
# Build from the repository root:
#   docker build -f infra/docker/mlflow.Dockerfile -t registry.example.com/dfcvae-mlflow:$(git rev-parse --short HEAD) .
FROM python:3.11-slim-bookworm

COPY pyproject.toml /tmp/pyproject.toml
RUN pip install --no-cache-dir --disable-pip-version-check \
      "$(python -c 'import tomllib; deps = tomllib.load(open("/tmp/pyproject.toml", "rb"))["project"]["dependencies"]; print(next(d.replace("mlflow", "mlflow[auth]", 1) for d in deps if d.split("==")[0] == "mlflow"))')" \
      "psycopg[binary]==3.3.9" boto3==1.44.5 \
 && rm /tmp/pyproject.toml \
 && useradd --uid 10001 --gid 0 --create-home mlflow

USER 10001
WORKDIR /home/mlflow
EXPOSE 5000
CMD ["mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1", "--port", "5000"]
