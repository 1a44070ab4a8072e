# The image of k8s/: Ray's GPU image (CUDA, Python 3.11, user `ray`, uid 1000, gid 100) plus
# FFCV's system libraries, torch, and this project installed at /home/ray/atcd_ray.
#   docker build --build-arg ATCD_RAY_COMMIT=$(git rev-parse HEAD) -t atcd-ray:0.1.0 .   (then push it)
# The image holds no .git: ATCD_RAY_COMMIT is the commit every run's summary.json records.
FROM rayproject/ray:2.60.0-py311-gpu

USER root
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      build-essential pkg-config libopencv-dev libturbojpeg0-dev \
 && rm -rf /var/lib/apt/lists/*
USER ray

# CUDA builds of torch; TORCH_INDEX picks the CUDA version matching the nodes' drivers.
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
RUN pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 --index-url ${TORCH_INDEX}

WORKDIR /home/ray/atcd_ray
COPY --chown=1000:100 pyproject.toml README.md constraints.txt ./
COPY --chown=1000:100 atcd_ray ./atcd_ray
COPY --chown=1000:100 pipelines ./pipelines
COPY --chown=1000:100 tune_spaces ./tune_spaces
# constraints.txt pins what setup.sh installs (its nvidia-* pins are CUDA 13's; this image's
# torch brings its own CUDA libraries, which it does not name).
ARG ATCD_RAY_COMMIT=
ENV ATCD_RAY_COMMIT=${ATCD_RAY_COMMIT}
RUN pip install --no-cache-dir -c constraints.txt -e '.[ffcv]' 'ray[default,train,tune]' \
 && pip install --no-cache-dir -c constraints.txt --no-deps torchattacks pyautoattack
