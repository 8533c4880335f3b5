# streamrnn worker/launcher image: the runtime (ONNX Runtime GPU build, Beam, pyarrow,
# prometheus-client) and the shipped models. Runs on the CPU when no GPU is visible.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY streamrnn ./streamrnn
COPY beam_jobs ./beam_jobs
COPY exported ./exported
RUN pip install --no-cache-dir . && useradd --create-home streamrnn
USER streamrnn
ENV STREAMRNN_MODEL=/app/exported/charlm.onnx
ENTRYPOINT ["python", "-m", "beam_jobs.next_token"]
CMD ["--demo", "--output", "/tmp/streamrnn-demo"]
