# One image for every BetterBot service; the compose file picks the module to run.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app

COPY pyproject.toml constraints.txt README.md ./
COPY shared ./shared
COPY services ./services
COPY devtools ./devtools
COPY cli ./cli
RUN pip install -c constraints.txt . \
    && useradd --system --uid 10001 --no-create-home betterbot
COPY config ./config
COPY data ./data

# Secrets (DOME_API_KEY, tokens) come from the environment or an env file, never the image.
USER betterbot
EXPOSE 8080 8081 8082 8083 8765
CMD ["python", "-m", "services.notifier"]
