# mninorm: normalise T1w brain MRI to MNI templates (a BIDS App).
#
#   docker build -t mninorm .
#   docker run --rm --read-only --tmpfs /tmp -v /data/bids:/bids:ro -v /data/out:/out \
#       mninorm /bids /out participant --participant-label 01
#
# Build arguments (all optional):
#   BASE_IMAGE        a Debian-based image with Python 3.11 (default: the pinned slim image below)
#   PIP_NO_INDEX, PIP_FIND_LINKS
#                     install from a local wheelhouse instead of the package index (air-gapped
#                     builds), e.g. with podman: -v "$PWD/wheels:/wheels:ro"
#                     --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels
#   PIP_INDEX_URL     a site's own package index (mirror) instead of PyPI
#   TEMPLATES, TEMPLATE_RESOLUTIONS
#                     what goes into /opt/templateflow (TemplateFlow names, res-N indices)
#   VERSION, VCS_REF  recorded in the OCI labels
#   IMAGE_NAME        where the image is published; with VERSION, recorded by mninorm in
#                     dataset_description.json (GeneratedBy.Container)
# Templates come from TemplateFlow's servers unless a local TemplateFlow home is given as the
# named build context "templates-local" (docker buildx / podman):
#   --build-context templates-local=/path/to/templateflow
# Then nothing is downloaded and only the real files of that folder are copied.

ARG BASE_IMAGE=docker.io/library/python:3.11.13-slim-bookworm@sha256:86adf8dbadc3d6e82ee5dd2c74bec2e1c2467cdad47886280501df722372d2e1

# An empty stage unless replaced by --build-context templates-local=DIR.
FROM scratch AS templates-local

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 \
    LC_ALL=C.UTF-8 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---------------------------------------------------------------------------------------------
# Third-party dependencies only, read from pyproject.toml: this layer is rebuilt when the
# dependencies change, not when the code does. The test suites that wheels ship (~160 MB of
# scipy, pandas, statsmodels, ...) are dropped: nothing imports them at run time.
FROM base AS deps
# Unset unless given: pip then uses the package index as usual.
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
WORKDIR /build
COPY pyproject.toml ./
# The installed extras: stats (group statistics), dask (--dask-scheduler and dask-jobqueue
# clusters, docs/scale.md).
ARG EXTRAS="stats dask"
RUN python3 -m venv "$VIRTUAL_ENV" \
 && python3 -c "import os, tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; deps = project['dependencies'] + [d for extra in os.environ['EXTRAS'].split() for d in project['optional-dependencies'][extra]]; open('requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
 && cat requirements.txt \
 && pip install --no-cache-dir --requirement requirements.txt \
 && find "$VIRTUAL_ENV/lib" -depth -type d -name tests -path '*/site-packages/*' -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
# The package itself, as a wheel (its build backend comes from the index or the wheelhouse).
FROM deps AS wheel
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ARG PIP_INDEX_URL
COPY pyproject.toml README.md ./
COPY bids_app ./bids_app
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---------------------------------------------------------------------------------------------
# Templates, pre-fetched into a fixed folder outside any $HOME.
FROM deps AS templates
ARG TEMPLATES="MNI152NLin2009cAsym MNI152NLin6Asym OASIS30ANTs"
ARG TEMPLATE_RESOLUTIONS="1 2"
COPY docker/fetch_templates.py /usr/local/bin/fetch_templates.py
COPY --from=templates-local . /tmp/templateflow-local/
# Word splitting of the two lists is intended.
# hadolint ignore=SC2086
RUN if [ -n "$(ls -A /tmp/templateflow-local)" ]; then local_args="--local /tmp/templateflow-local"; fi \
 && python3 /usr/local/bin/fetch_templates.py /opt/templateflow \
        --templates $TEMPLATES --resolutions $TEMPLATE_RESOLUTIONS ${local_args:-}

# ---------------------------------------------------------------------------------------------
FROM base AS runtime
ARG VERSION=unknown
ARG VCS_REF=unknown
ARG IMAGE_NAME=ghcr.io/mninorm/mninorm
LABEL org.opencontainers.image.title="mninorm" \
      org.opencontainers.image.description="BIDS App: normalise T1w brain MRI to MNI templates with ANTsPy" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${VCS_REF}" \
      org.opencontainers.image.source="https://github.com/mninorm/mninorm" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=deps /opt/venv /opt/venv
COPY --from=templates /opt/templateflow /opt/templateflow
COPY --from=wheel /dist /tmp/dist
RUN pip install --no-cache-dir --no-index --no-deps /tmp/dist/*.whl \
 && rm -rf /tmp/dist \
 && useradd --uid 1000 --user-group --no-create-home --home-dir /tmp --shell /usr/sbin/nologin mninorm

# Nothing below needs a writable $HOME or a passwd entry, so any uid works (docker --user,
# Singularity/Apptainer): caches go to /tmp, templates are read-only, TemplateFlow never updates.
# The thread counts are defaults for whatever is not told otherwise; mninorm --nthreads /
# --omp-nthreads set them for its own run. The DASK_ variables are bids_app.scheduler.CLUSTER_CONFIG
# (a test keeps them equal): workers must not be daemonic, since each participant runs in a process
# the worker starts, and they wake up less often, since their tasks wait minutes on that process.
ENV HOME=/tmp \
    TMPDIR=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    MPLCONFIGDIR=/tmp/matplotlib \
    TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0 \
    ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=1 \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    MNINORM_CONTAINER_IMAGE=${IMAGE_NAME}:${VERSION} \
    DASK_DISTRIBUTED__WORKER__DAEMON=False \
    DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False \
    DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL=1s \
    DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL=1s \
    DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL=2s

USER 1000:1000
WORKDIR /tmp
ENTRYPOINT ["mninorm"]
CMD ["--help"]
