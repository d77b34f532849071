# The demo trainer of docker-compose.yml: `gradwatch demo` in a loop, torch on CPU.
# Each round trains a small model through an unstable phase that gradwatch's rules rescue.
FROM python:3.11-slim
RUN pip install --no-cache-dir torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY gradwatch ./gradwatch
COPY spool ./spool
COPY probes ./probes
COPY agent ./agent
COPY rules ./rules
COPY dashboards ./dashboards
RUN pip install --no-cache-dir . && rm -rf /src
ENV GRADWATCH_HOME=/spool GRADWATCH_AUTOSTART=0 PYTHONUNBUFFERED=1
CMD ["sh", "-c", "while true; do gradwatch demo --no-live --steps 1200; sleep 20; done"]
