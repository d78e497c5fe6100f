#!/usr/bin/env bash
# ONNX Runtime's C/C++ API headers for r1c's CPU kernel library (r1c/plugins/cpu_moe), from Debian's
# `libonnxruntime-dev` (trixie, 1.21; the pip wheel ships no headers). Only the .deb is fetched and unpacked,
# through an apt configuration of its own: this machine's apt sources and installed packages are not touched.
# Writes ${R1C_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/r1c}/onnxruntime-headers/include/onnxruntime/*.h and prints
# that directory (r1c finds it there; or point R1C_ORT_INCLUDE at any directory holding onnxruntime_cxx_api.h).
# A machine with Debian 13+ can instead `apt-get install libonnxruntime-dev` (headers in /usr/include/onnxruntime).
set -euo pipefail
cache="${R1C_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/r1c}/onnxruntime-headers"
dest="$cache/include/onnxruntime"
if [ -f "$dest/onnxruntime_cxx_api.h" ] && [ -f "$dest/onnxruntime_lite_custom_op.h" ]; then
    echo "$dest"
    exit 0
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/deb"
echo "deb http://deb.debian.org/debian trixie main" > "$work/sources.list"
apt_opts=(-q -o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=/nonexistent"
          -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache" -o "APT::Sandbox::User=root")
apt-get "${apt_opts[@]}" update >&2
(cd "$work/deb" && apt-get "${apt_opts[@]}" download libonnxruntime-dev >&2)
dpkg-deb -x "$work"/deb/libonnxruntime-dev_*.deb "$work/root"
mkdir -p "$cache/include"
rm -rf "$dest.partial" && cp -r "$work/root/usr/include/onnxruntime" "$dest.partial" && mv "$dest.partial" "$dest"
echo "$dest"
