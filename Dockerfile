FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY weft ./weft
COPY projections ./projections
RUN pip install --no-cache-dir . && useradd --uid 10001 --create-home weft
# Not root: ops/k8s runs it as uid 10001 with a read-only root filesystem (writable /tmp).
USER 10001
ENV HOME=/home/weft
ENV API_HOST=0.0.0.0 API_PORT=3000
EXPOSE 3000
CMD ["weft", "serve"]
