# Dockerfile: nanochat-spark as a container image, so that the host needs nothing but Docker and
# the NVIDIA Container Toolkit (DGX OS ships both). One file for linux/arm64 (DGX Spark, GB10)
# and linux/amd64 (H100 and other x86 machines). Build and run it with ./docker.sh; the README's
# "Container" section says what was tested and what was not.
#
# The image holds Ubuntu 24.04 with the CUDA 13 runtime, the Debian packages setup.sh would
# install (installed here as root, because the image runs as a user without sudo), and this
# checkout made ready by its own ./setup.sh (uv, .venv, the rustbpe extension). It holds no
# data, tokenizer or checkpoint: those live on the volume at $NANOCHAT_BASE_DIR (/data).
FROM nvidia/cuda:13.0.1-runtime-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# What setup.sh needs to run (python3 to install uv from PyPI, a C compiler and curl for the Rust
# toolchain below), CUDA's ptxas (cuda-nvcc, from the NVIDIA repository the base image has
# configured: the runtime image has none, and on a GB10 Triton's own ptxas may reject sm_121a;
# dev/check_accelerator.py looks for /usr/local/cuda*/bin/ptxas), then the packages of dev/apt_packages.txt (the chat tasks' files, bubblewrap for the
# code sandbox) and dev/offline_packages.txt (the offline corpus's texts), so setup.sh finds them
COPY dev/apt_packages.txt dev/offline_packages.txt /tmp/packages/
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential ca-certificates cuda-nvcc-13-0 curl \
       python3 python3-dev python3-pip python3-venv \
    && grep -hv -e '^#' -e '^$' /tmp/packages/apt_packages.txt /tmp/packages/offline_packages.txt | cut -d' ' -f1 \
       | xargs apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/packages

# A user of its own: training, the code sandbox and the server never run as root. Its ids are
# the host user's (docker.sh build passes them), so the files it writes to the mounted base dir
# are yours; Ubuntu's own user 1000 makes way. /data is the volume for $NANOCHAT_BASE_DIR (data,
# tokenizer, checkpoints, logs, report)
ARG UID=1000
ARG GID=1000
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && (getent group "$GID" >/dev/null || groupadd --gid "$GID" nanochat) \
    && useradd --create-home --uid "$UID" --gid "$GID" --shell /bin/bash nanochat \
    && mkdir /data && chown "$UID:$GID" /data
USER $UID:$GID
ENV NANOCHAT_BASE_DIR=/data \
    PATH=/home/nanochat/.local/bin:/home/nanochat/.cargo/bin:$PATH
WORKDIR /home/nanochat/nanochat-spark

# Rust for rustbpe, from rustup as setup.sh tells users to install it: Ubuntu 24.04's cargo (1.75)
# is older than rayon 1.12 needs (1.80)
RUN curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --no-modify-path

# The checkout (.dockerignore keeps out .venv and build outputs), made ready by its own setup
# script: the same steps a user runs outside the container. The GPU check it ends with sees no
# GPU while the image builds; dev/docker_entrypoint.sh runs it again when a container starts
COPY --chown=$UID:$GID . .
RUN ./setup.sh

VOLUME ["/data"]
EXPOSE 8000
# chat_web answers /health with 200 once its model is loaded (a training container turns this off:
# docker.sh runs it with --no-healthcheck)
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s --retries=3 \
    CMD ["bash", "-c", "curl -fsS http://127.0.0.1:8000/health >/dev/null || exit 1"]
ENTRYPOINT ["dev/docker_entrypoint.sh"]
CMD ["./chat.sh", "--host", "0.0.0.0", "--port", "8000"]
