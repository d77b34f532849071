# The gradwatch agent, without torch (the agent never needs it). Used by docker-compose.yml.
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY gradwatch ./gradwatch
COPY spool ./spool
COPY probes ./probes
COPY agent ./agent
COPY rules ./rules
COPY dashboards ./dashboards
RUN pip install --no-cache-dir ".[agent,grafana]" && rm -rf /src
ENV GRADWATCH_HOME=/spool GRADWATCH_HOST=0.0.0.0
EXPOSE 9478
ENTRYPOINT ["gradwatch", "agent"]
