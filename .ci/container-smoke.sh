#!/usr/bin/env bash
# Container smoke test: build the mninorm image with podman and run it the way BIDS Apps users do
# (read-only root filesystem, a non-root uid with no passwd entry and no writable $HOME, no network,
# the input mounted read-only), at participant and then group level, and check the outputs.
#
#   bash .ci/container-smoke.sh           from the repository root, as root
#
# By default the build is air-gapped, as on machines without a registry or TemplateFlow access:
#   - base image: Debian bookworm + Python 3.11 made with debootstrap and imported as
#     localhost/debian-py:bookworm (once; reused while it exists)
#   - Python packages: a wheelhouse made on the host with `pip download` of the project, given to
#     the build with PIP_NO_INDEX/PIP_FIND_LINKS
#   - templates: ../shared/data/templateflow, given as the build context "templates-local"
#   - the build itself runs with --network none
# With MNINORM_SMOKE_ONLINE=1 it builds as a user would instead: the Dockerfile's default base
# image, the package index and TemplateFlow's servers.
# Input: ../shared/data/heads (sub-01, 2 mm) when present, else a dataset made from a template
# inside the image (a head with a changed pose).
#
# Settings (environment):
#   MNINORM_SMOKE_ONLINE=1     build from the public base/index/TemplateFlow (see above)
#   MNINORM_SMOKE_DIR          scratch folder (default /tmp/mninorm-smoke): wheelhouse, outputs
#   MNINORM_SMOKE_IMAGE        tag to build (default localhost/mninorm:smoke)
#   MNINORM_SMOKE_KEEP=1       keep the run's input/output/work folders
#   MNINORM_SMOKE_NO_CACHE=1   build every layer again (a cold build)
#   MNINORM_SMOKE_NTHREADS     --nthreads for the participant run (default 2)
#   MNINORM_SHARED             the shared folder (default ../shared next to the repository)
#   DEBIAN_MIRROR              for debootstrap (default http://deb.debian.org/debian)
#   PYTHON                     the host's Python, used for `pip download` (default python3)
#
# Exit status: 0 when every check passed, or when podman cannot be installed or used here (then it
# says SKIPPED and why); 1 when the build, a run or a check failed.

set -Eeuo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SHARED=${MNINORM_SHARED:-$REPO/../shared}
SHARED=$(cd "$SHARED" 2>/dev/null && pwd || echo "$SHARED")
SCRATCH=${MNINORM_SMOKE_DIR:-/tmp/mninorm-smoke}
IMAGE=${MNINORM_SMOKE_IMAGE:-localhost/mninorm:smoke}
ONLINE=${MNINORM_SMOKE_ONLINE:-0}
NTHREADS=${MNINORM_SMOKE_NTHREADS:-2}
PYTHON=${PYTHON:-python3}
BASE_IMAGE=localhost/debian-py:bookworm
RUN_UID=1234:1234
SPACE=MNI152NLin2009cAsym

say() { printf '[container-smoke] %s\n' "$*"; }
skip() {
    say "SKIPPED: $*"
    exit 0
}
fail() {
    say "FAILED: $*" >&2
    exit 1
}
trap 'say "FAILED: line $LINENO: $BASH_COMMAND (exit $?)" >&2' ERR

# --- podman ---------------------------------------------------------------------------------

ensure_podman() {
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    command -v runc >/dev/null || [[ -x /usr/sbin/runc ]] || missing+=(runc)
    if [[ $ONLINE != 1 ]] && ! podman image exists "$BASE_IMAGE" 2>/dev/null; then
        command -v debootstrap >/dev/null || [[ -x /usr/sbin/debootstrap ]] || missing+=(debootstrap)
    fi
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) == 0 ]] || skip "${missing[*]} not installed, and installing needs root"
    command -v apt-get >/dev/null || skip "${missing[*]} not installed, and there is no apt-get"
    say "installing podman runc debootstrap with apt-get"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
        podman runc debootstrap debian-archive-keyring >/dev/null; }; then
        skip "apt-get could not install podman/runc/debootstrap"
    fi
}

# podman's defaults fail on these machines (setrlimit, cgroups): runc and no default ulimits.
setup_podman() {
    mkdir -p "$SCRATCH"
    printf '[containers]\ndefault_ulimits = []\n' >"$SCRATCH/containers.conf"
    export CONTAINERS_CONF=$SCRATCH/containers.conf
    local runc
    runc=$(command -v runc || echo /usr/sbin/runc)
    PODMAN=(podman --runtime "$runc")
    [[ $(id -u) == 0 ]] || skip "podman is run rootful here and this is not root"
    "${PODMAN[@]}" info >/dev/null 2>&1 || skip "podman is installed but does not work here: $(
        "${PODMAN[@]}" info 2>&1 | tail -n 1
    )"
}

# Debian bookworm with Python 3.11, made locally: there is no registry to pull a base from.
ensure_base_image() {
    if "${PODMAN[@]}" image exists "$BASE_IMAGE"; then
        say "base image $BASE_IMAGE: present"
    else
        local rootfs=$SCRATCH/rootfs start=$SECONDS
        say "base image $BASE_IMAGE: debootstrap bookworm (about a minute)"
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" >"$SCRATCH/debootstrap.log" 2>&1 ||
            fail "debootstrap failed, see $SCRATCH/debootstrap.log"
        tar -C "$rootfs" -c . | "${PODMAN[@]}" import - "$BASE_IMAGE" >/dev/null
        rm -rf "$rootfs"
        say "base image made in $((SECONDS - start)) s"
    fi
    "${PODMAN[@]}" run --rm --network none "$BASE_IMAGE" true ||
        skip "podman cannot run a container here"
}

# --- build ----------------------------------------------------------------------------------

# Wheels of the project's dependencies (and of its build backend), for a build without an index.
make_wheelhouse() {
    local host_py base_py
    host_py=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    base_py=$("${PODMAN[@]}" run --rm --network none "$BASE_IMAGE" \
        python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [[ $host_py == "$base_py" ]] ||
        fail "the host's $PYTHON is $host_py but the base image has Python $base_py: the wheels would not fit (set PYTHON)"
    WHEELHOUSE=$SCRATCH/wheelhouse
    mkdir -p "$WHEELHOUSE"
    local build_requires
    build_requires=$("$PYTHON" -c 'import sys, tomllib; print("\n".join(tomllib.load(open(sys.argv[1], "rb"))["build-system"]["requires"]))' "$REPO/pyproject.toml")
    say "wheelhouse: pip download of the project into $WHEELHOUSE"
    # From a copy: building the project's metadata would leave an .egg-info in the work tree.
    local project=$SCRATCH/project
    rm -rf "$project"
    mkdir -p "$project"
    cp -R "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/bids_app" "$project/"
    local -a requires
    mapfile -t requires <<<"$build_requires"
    # The extras the image installs (the Dockerfile's ARG EXTRAS), so their wheels are here too.
    local extras
    extras=$(sed -n 's/^ARG EXTRAS="\(.*\)"$/\1/p' "$REPO/Dockerfile" | tr ' ' ',')
    [[ -n $extras ]] || fail "no ARG EXTRAS=\"...\" line in $REPO/Dockerfile"
    "$PYTHON" -m pip download --quiet --disable-pip-version-check --dest "$WHEELHOUSE" \
        "${project}[${extras}]" "${requires[@]}" >"$SCRATCH/pip-download.log" 2>&1 ||
        fail "pip download failed, see $SCRATCH/pip-download.log"
    rm -rf "$project"
}

build_image() {
    local version revision
    version=$("$PYTHON" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["project"].get("version", "unknown"))' "$REPO/pyproject.toml" 2>/dev/null || echo unknown)
    revision=$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)
    EXPECTED_VERSION=$version
    local -a args=(--layers --build-arg "VERSION=$version" --build-arg "VCS_REF=$revision")
    [[ ${MNINORM_SMOKE_NO_CACHE:-0} != 1 ]] || args+=(--no-cache)
    if [[ $ONLINE == 1 ]]; then
        say "build: default base image, package index, TemplateFlow's servers"
    else
        local templates=$SHARED/data/templateflow
        args+=(--network none -v "$WHEELHOUSE:/wheels:ro"
            --build-arg "BASE_IMAGE=$BASE_IMAGE"
            --build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/wheels
            --build-context "templates-local=$templates")
        say "build: offline (base $BASE_IMAGE, wheelhouse, templates from $templates)"
    fi
    # Earlier builds leave untagged layers behind; drop the week-old ones, keep the recent cache.
    "${PODMAN[@]}" image prune --force --filter until=168h >/dev/null 2>&1 || true
    local start=$SECONDS
    "${PODMAN[@]}" build "${args[@]}" -t "$IMAGE" "$REPO" >"$SCRATCH/build.log" 2>&1 || {
        tail -n 40 "$SCRATCH/build.log" >&2
        fail "podman build failed, see $SCRATCH/build.log"
    }
    BUILD_SECONDS=$((SECONDS - start))
    grep -A 20 'fetch_templates.py /opt/templateflow' "$SCRATCH/build.log" | grep -E '^  ' || true
    say "build: $BUILD_SECONDS s"
}

# --- checks ---------------------------------------------------------------------------------

# The options every run gets: what a careful site (or Singularity) imposes.
run_opts() {
    RUN=("${PODMAN[@]}" run --rm --read-only --read-only-tmpfs=false --tmpfs "/tmp:rw,mode=1777"
        --user "$RUN_UID" --env HOME=/nonexistent --network none)
}

check_image_config() {
    local user entrypoint labels
    user=$("${PODMAN[@]}" image inspect --format '{{.Config.User}}' "$IMAGE")
    entrypoint=$("${PODMAN[@]}" image inspect --format '{{json .Config.Entrypoint}}' "$IMAGE")
    labels=$("${PODMAN[@]}" image inspect --format '{{json .Config.Labels}}' "$IMAGE")
    [[ -n $user && $user != 0 && $user != root && $user != 0:* ]] || fail "image USER is root ('$user')"
    [[ $entrypoint == '["mninorm"]' ]] || fail "ENTRYPOINT is $entrypoint, not [\"mninorm\"]"
    local key
    for key in title version revision source licenses; do
        [[ $labels == *"\"org.opencontainers.image.$key\""* ]] || fail "label org.opencontainers.image.$key missing"
    done
    say "image config: USER $user, ENTRYPOINT $entrypoint, OCI labels present"
}

check_version() {
    local out
    out=$("${RUN[@]}" "$IMAGE" --version 2>&1) || fail "--version failed: $out"
    [[ $EXPECTED_VERSION == unknown || $out == *"$EXPECTED_VERSION"* ]] ||
        fail "--version said '$out', expected $EXPECTED_VERSION"
    say "--version: $out"
}

# Templates: real files only, found through TemplateFlow offline, as the app will look for them.
check_templates() {
    "${RUN[@]}" --entrypoint python3 "$IMAGE" -c '
import os, pathlib, sys
home = pathlib.Path(os.environ["TEMPLATEFLOW_HOME"])
files = [p for p in home.rglob("*") if p.is_file()]
empty = [str(p) for p in files if p.stat().st_size == 0]
if empty:
    sys.exit(f"0-byte placeholders in {home}: {empty}")
from templateflow import api
for tpl in ("MNI152NLin2009cAsym", "MNI152NLin6Asym", "OASIS30ANTs"):
    t1w = api.get(tpl, resolution=1, desc=None, suffix="T1w", extension=".nii.gz")
    mask = api.get(tpl, resolution=1, desc="brain", suffix="mask", extension=".nii.gz")
    if not (t1w and mask):
        sys.exit(f"{tpl} res-1 T1w/mask not found under {home}")
print(f"templates: {len(files)} files in {home}, the output and brain-extraction templates resolve offline")
' || fail "template check failed"
}

# A one-participant BIDS dataset when ../shared is absent: a template head with another pose.
make_synthetic_bids() {
    local bids=$1
    install -d -m 0777 "$bids"
    "${RUN[@]}" -v "$bids:/bids" --entrypoint python3 "$IMAGE" -c '
import json, pathlib
import nibabel as nib
import numpy as np
from templateflow import api
src = nib.load(api.get("MNI152NLin6Asym", resolution=2, desc=None, suffix="T1w", extension=".nii.gz"))
angle = np.deg2rad(8.0)
pose = np.array([[np.cos(angle), -np.sin(angle), 0, 4.0],
                 [np.sin(angle), np.cos(angle), 0, -6.0],
                 [0, 0, 1, 3.0], [0, 0, 0, 1]])
anat = pathlib.Path("/bids/sub-01/anat")
anat.mkdir(parents=True)
nib.Nifti1Image(np.asarray(src.dataobj, dtype=np.float32), pose @ src.affine).to_filename(
    anat / "sub-01_T1w.nii.gz")
(pathlib.Path("/bids") / "dataset_description.json").write_text(json.dumps(
    {"Name": "mninorm container smoke test", "BIDSVersion": "1.9.0", "DatasetType": "raw"}))
' || fail "could not make the synthetic dataset"
}

check_outputs() {
    local out=$1 absent=0 rel
    local -a expected=(
        dataset_description.json
        "sub-01/anat/sub-01_space-${SPACE}_desc-preproc_T1w.nii.gz"
        "sub-01/anat/sub-01_from-T1w_to-${SPACE}_mode-image_xfm.h5"
    )
    for rel in "${expected[@]}"; do
        if [[ -s $out/$rel ]]; then
            say "output ok: $rel"
        else
            say "output MISSING or empty: $rel" >&2
            absent=1
        fi
    done
    local foreign
    foreign=$(find "$out" -mindepth 1 ! -uid "${RUN_UID%%:*}" -print -quit)
    [[ -z $foreign ]] || fail "$foreign is not owned by uid ${RUN_UID%%:*}"
    ((absent == 0)) || {
        say "the output folder holds:" >&2
        (cd "$out" && find . -type f | sort) >&2
        fail "expected outputs missing"
    }
}

# --- main -----------------------------------------------------------------------------------

main() {
    cd "$REPO"
    ensure_podman
    setup_podman
    if [[ $ONLINE != 1 ]]; then
        # Like the other tests that use ../shared: skipped, not failed, where it is absent.
        [[ -d $SHARED/data/templateflow ]] ||
            skip "no $SHARED/data/templateflow for an offline build (MNINORM_SMOKE_ONLINE=1 fetches templates)"
        ensure_base_image
        make_wheelhouse
    fi
    build_image
    local size
    size=$("${PODMAN[@]}" image inspect --format '{{.Size}}' "$IMAGE")

    run_opts
    check_image_config
    check_version
    check_templates

    local run_dir bids
    run_dir=$(mktemp -d "$SCRATCH/run.XXXXXX")
    chmod 0755 "$run_dir"
    # Kept after a failure (and with MNINORM_SMOKE_KEEP=1) for a look; removed after a pass.
    RUN_DIR=$run_dir
    trap 'status=$?; if ((status == 0)) && [[ ${MNINORM_SMOKE_KEEP:-0} != 1 ]]; then rm -rf "$RUN_DIR"; else say "run folder kept: $RUN_DIR"; fi' EXIT
    install -d -m 0777 "$run_dir/out" "$run_dir/work"
    if [[ -f $SHARED/data/heads/sub-01/anat/sub-01_T1w.nii.gz ]]; then
        bids=$(cd "$SHARED/data/heads" && pwd)
        say "input: $bids (sub-01)"
    else
        bids=$run_dir/bids
        make_synthetic_bids "$bids"
        say "input: $SHARED/data/heads not found; made $bids from a template"
    fi
    local -a mounts=(-v "$bids:/data/bids:ro" -v "$run_dir/out:/data/out" -v "$run_dir/work:/data/work")

    local start=$SECONDS
    say "participant level: sub-01, --preset fast, --nthreads $NTHREADS"
    "${RUN[@]}" "${mounts[@]}" "$IMAGE" /data/bids /data/out participant \
        --participant-label 01 --preset fast --nthreads "$NTHREADS" -w /data/work ||
        fail "participant level exited with $?"
    local participant_seconds=$((SECONDS - start))

    start=$SECONDS
    say "group level"
    "${RUN[@]}" "${mounts[@]}" "$IMAGE" /data/bids /data/out group -w /data/work ||
        fail "group level exited with $?"
    local group_seconds=$((SECONDS - start))

    check_outputs "$run_dir/out"

    say "PASSED"
    say "image $IMAGE: $((size / 1000000)) MB ($size bytes)"
    say "build wall time: ${BUILD_SECONDS} s; participant run: ${participant_seconds} s; group run: ${group_seconds} s; whole script: ${SECONDS} s"
}

main "$@"
