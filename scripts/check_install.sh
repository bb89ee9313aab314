#!/usr/bin/env bash
# Install smollm3 as a user would (a built wheel, not the editable checkout) into a fresh venv
# outside the checkout, then run a one-shot answer and open the chat from there.
# The venv borrows the dependencies of .venv (a .pth line), so nothing is downloaded again.
# Usage: scripts/check_install.sh [MODEL.gguf]   (default: models/SmolLM2-135M-Instruct.Q4_1.gguf)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=$(realpath "${1:-$ROOT/models/SmolLM2-135M-Instruct.Q4_1.gguf}")
PY="${SMOLLM3_PYTHON:-$ROOT/.venv/bin/python}"  # the set-up venv, whose packages are borrowed
WORK=$(mktemp -d /tmp/smollm3-install.XXXXXX)
SESSION="smollm3-install-$$"
cleanup() { tmux kill-session -t "$SESSION" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT

# The wheel, built from a copy of the tree so that the checkout gets no build/ or egg-info.
mkdir -p "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) |
  tar -xf - -C "$WORK/src"
if "$PY" -c "import setuptools" 2>/dev/null; then isolation=--no-build-isolation; else isolation=; fi
"$PY" -m pip wheel -q --no-deps $isolation -w "$WORK/dist" "$WORK/src"

"$PY" -m venv --without-pip "$WORK/venv"
SITE=$("$WORK/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
# A plain path line: .venv's packages become importable, its .pth files (the editable install
# of this checkout) are not run.
"$PY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > "$SITE/smollm3-deps.pth"
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-deps --no-index "$WORK"/dist/smollm3-*.whl
rm -rf "$WORK/src"

cd "$WORK"  # nothing of the checkout on the path
unset PYTHONPATH
where=$("$WORK/venv/bin/python" -c "import app, assets; print(app.__file__)")
case "$where" in "$SITE"/*) ;; *) echo "check_install: app imported from $where, not the venv" >&2; exit 1 ;; esac

answer=$(timeout 120 "$WORK/venv/bin/smollm3" --model-path "$MODEL" --temperature 0 -n 24 \
  --prompt "Name the capital of France." 2>"$WORK/err") || { cat "$WORK/err" >&2; exit 1; }
grep -q Paris <<<"$answer" || { echo "check_install: no Paris in: $answer" >&2; exit 1; }
echo "check_install: --prompt from the wheel: $answer"

if ! command -v tmux >/dev/null; then
  echo "check_install: no tmux: the chat's first screen was not checked" >&2; exit 0
fi
# The chat's first screen, in a real terminal (Textual draws on stderr): it must come up with the
# model loaded.
tmux new-session -d -s "$SESSION" -x 100 -y 30 \
  "'$WORK/venv/bin/smollm3' --model-path '$MODEL'; echo \$? > '$WORK/chat-rc'; sleep 60"
for _ in $(seq 1 300); do
  screen=$(tmux capture-pane -p -t "$SESSION" 2>/dev/null || true)
  [ -e "$WORK/chat-rc" ] && break
  grep -qE "ctx [0-9]+/[0-9]+" <<<"$screen" && break  # the status line: the model is loaded
  sleep 0.1
done
if [ -e "$WORK/chat-rc" ] || ! grep -qE "ctx [0-9]+/[0-9]+" <<<"$screen"; then
  echo "check_install: the chat did not open:" >&2; echo "$screen" >&2; exit 1
fi
echo "check_install: the chat opened from the wheel"
