FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY weft ./weft
COPY projections ./projections
RUN pip install --no-cache-dir .
ENV API_HOST=0.0.0.0 API_PORT=3000
EXPOSE 3000
CMD ["weft", "serve"]
