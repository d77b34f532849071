# The gradwatch agent, without torch (the agent never needs it).
FROM python:3.11-slim
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY gradwatch ./gradwatch
COPY spool ./spool
COPY probes ./probes
COPY agent ./agent
RUN pip install --no-cache-dir . && rm -rf /src
ENV GRADWATCH_HOME=/spool GRADWATCH_HOST=0.0.0.0
EXPOSE 9478
ENTRYPOINT ["gradwatch", "agent"]
