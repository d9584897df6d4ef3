# The project image used by the Prefect worker and the servers in docker-compose.yml.
FROM python:3.11-slim
# OCR: Tesseract reads images; poppler's pdftoppm renders the pages of scanned PDFs for it.
RUN apt-get update && apt-get install -y --no-install-recommends tesseract-ocr poppler-utils \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md LICENSE prefect.yaml ./
COPY refinery refinery
COPY flows flows
COPY tasks tasks
COPY model model
COPY storage storage
COPY serving serving
# CPU build of torch first, so nothing pulls the multi-GB CUDA build.
RUN pip install --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu \
 && pip install --no-cache-dir . psycopg2-binary asyncpg boto3
# Compile the filter's numba loops once, into the image's cache, so no container compiles them on its first run.
RUN python -c "from refinery.tasks.filter import compile_loops; compile_loops()"
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
