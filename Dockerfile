# carbond container image: a wheel built in one stage, installed into a slim runtime.
# The DaemonSet runs it as root with every capability dropped: root owns RAPL's 0400 energy_uj files, so no
# capability is needed to read them; everything else is read-only.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY carbond ./carbond
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
LABEL org.opencontainers.image.title="carbond" \
      org.opencontainers.image.description="Energy and carbon footprint of a machine's computing, for Prometheus"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl "nvidia-ml-py>=12.535" "bcrypt>=4" && rm -rf /wheels
COPY config.example.yaml /etc/carbond/config.yaml
EXPOSE 9875
# `carbond healthcheck` asks /healthz where the daemon listens: the --listen or --config of PID 1's `carbond run`
# (run as a module: it skips the rest of the command line's imports, a quarter of the CPU every 30 s).
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
  CMD ["python", "-m", "carbond.healthcheck", "--timeout", "4"]
ENTRYPOINT ["carbond"]
CMD ["run", "--config", "/etc/carbond/config.yaml", "--listen", "0.0.0.0:9875", "--log-format", "json"]
