#!/usr/bin/env bash
# CI step 1b: the device path (base install: `fedmfs-edge predict` and the Shapley engine) on aarch64,
# under qemu-user emulation, on the model set and windows step 1 of .ci/run made; its numbers must
# equal the x86 device environment's within 1e-5.
#
#   bash .ci/arm_smoke.sh WORK EDGE_TOML WINDOWS_NPZ MODEL_DIR
#
# WORK is step 1's directory: WORK/device-venv (the x86 base install) and WORK/pred.txt (its
# `fedmfs-edge predict` output). Run as root on a Debian/Ubuntu x86_64 machine. It
#   - installs qemu-user-static, binfmt-support, mmdebstrap and time (apt), mounts binfmt_misc if
#     needed and enables qemu-aarch64 (with the F flag, so the emulator works inside a chroot);
#   - extracts an arm64 Debian root of the host's release with mmdebstrap --variant=extract
#     (python3-venv, libstdc++6, coreutils: seconds, nothing is configured under emulation);
#   - downloads with the host's pip the aarch64 wheels of exactly the versions the x86 device
#     environment has (manylinux, the root's Python), plus a wheel of fedmfs built here;
#   - in a private mount namespace (mounts vanish with it; a trap unmounts them too) mounts /proc,
#     a read-only /sys and over the root's /proc/cpuinfo a made-up 2-core Cortex-A72 one
#     (onnxruntime's cpuinfo crashes at import on an x86 /proc/cpuinfo under qemu), sets
#     QEMU_CPU=cortex-a72, and in a chroot: checks `uname -m` is aarch64, makes a venv, installs
#     offline (--no-index), checks torch is not importable, runs `fedmfs-edge predict`,
#     .ci/device_check.py and `.ci/arm_compare.py dump`;
#   - compares with the same on x86 (.ci/arm_compare.py compare) and prints sizes, peak RSS and times.
set -Eeuo pipefail
trap 'echo "arm smoke: FAILED at line $LINENO of $0: $BASH_COMMAND" >&2' ERR

say() { echo "arm smoke: $*"; }
die() { echo "arm smoke: FAILED: $*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

ROOTPATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
VENV=/opt/fedmfs-venv                 # inside the arm64 root
FAKE_CPU=cortex-a72

# ---------------------------------------------------------------------------------------------------
# The inside part: run by the outside part in a private mount namespace (unshare --mount).
# ---------------------------------------------------------------------------------------------------
if [ "${1:-}" = "--inside" ]; then
    root=$2 tmp=$3 edge_toml=$4 windows=$5 model_dir=$6
    mounted=()
    cleanup_mounts() {
        local i
        for ((i = ${#mounted[@]} - 1; i >= 0; i--)); do
            umount "${mounted[i]}" 2>/dev/null || umount -l "${mounted[i]}" 2>/dev/null || true
        done
    }
    trap cleanup_mounts EXIT
    mount --make-rprivate / || die "cannot make the namespace's mounts private"
    mkdir -p "$root/proc" "$root/sys"
    mount -t proc proc "$root/proc" && mounted+=("$root/proc") || die "cannot mount /proc in the root"
    mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys" && mounted+=("$root/sys") \
        || die "cannot mount /sys in the root"
    mount --bind "$tmp/cpuinfo" "$root/proc/cpuinfo" && mounted+=("$root/proc/cpuinfo") \
        || die "cannot bind the made-up /proc/cpuinfo"
    if [ ! -c "$root/dev/null" ]; then   # mmdebstrap's root mode makes the device nodes; else bind /dev
        mount --rbind /dev "$root/dev" && mounted+=("$root/dev") || die "cannot bind /dev into the root"
    fi
    # a clean environment: nothing of the host's (PYTHONPATH, pip config, VIRTUAL_ENV) leaks in
    in_root() { env -i PATH="$ROOTPATH" HOME=/root LANG=C.UTF-8 QEMU_CPU="$FAKE_CPU" chroot "$root" "$@"; }
    # RSS of the emulated process (qemu + the guest), measured by the host's GNU time
    timed() { local out=$1; shift; /usr/bin/time -v -o "$out" env -i PATH="$ROOTPATH" HOME=/root LANG=C.UTF-8 \
        QEMU_CPU="$FAKE_CPU" chroot "$root" "$@"; }

    arch=$(in_root uname -m) || die "cannot run the root's uname (is qemu-aarch64 registered with binfmt_misc?)"
    [ "$arch" = aarch64 ] || die "uname -m inside the root says '$arch', not aarch64"
    say "inside the root: uname -m = $arch, QEMU_CPU=$FAKE_CPU, /proc/cpuinfo: $(grep -c '^processor' "$root/proc/cpuinfo") x Cortex-A72"

    t=$(now)
    in_root /usr/bin/python3 -m venv "$VENV" || die "python3 -m venv failed in the root"
    say "venv made in $(since "$t") s"
    t=$(now)
    in_root "$VENV/bin/python" -m pip install --quiet --no-index --find-links /wheels fedmfs \
        || die "the offline install of fedmfs (base) failed in the root"
    say "base install (offline) in $(since "$t") s: $(in_root "$VENV/bin/python" -m pip freeze | tr '\n' ' ')"
    if in_root "$VENV/bin/python" -c "import torch" 2>/dev/null; then
        die "torch is importable in the aarch64 device environment: the base install must not pull it in"
    fi
    in_root "$VENV/bin/python" -c "import onnxruntime" || die "onnxruntime does not import on aarch64 under qemu"

    t=$(now)
    timed "$tmp/rss-predict-arm.txt" "$VENV/bin/fedmfs-edge" predict --config "$edge_toml" --input "$windows" \
        --json > "$tmp/predict-arm.json" || die "fedmfs-edge predict failed on aarch64"
    say "fedmfs-edge predict in $(since "$t") s"
    t=$(now)
    timed "$tmp/rss-shapley-arm.txt" "$VENV/bin/python" /ci/device_check.py "$model_dir" "$windows" \
        || die ".ci/device_check.py (the Shapley engine) failed on aarch64"
    say "Shapley check in $(since "$t") s"
    in_root "$VENV/bin/python" /ci/arm_compare.py dump "$model_dir" "$windows" > "$tmp/dump-arm.json" \
        || die "arm_compare.py dump failed on aarch64"
    du -sk "$root$VENV" | cut -f1 > "$tmp/venv-kb"
    exit 0
fi

# ---------------------------------------------------------------------------------------------------
# The outside part
# ---------------------------------------------------------------------------------------------------
[ $# -eq 4 ] || die "usage: $0 WORK EDGE_TOML WINDOWS_NPZ MODEL_DIR"
work=$(realpath "$1") edge_toml=$(realpath "$2") windows=$(realpath "$3") model_dir=$(realpath "$4")
here=$(cd "$(dirname "$0")/.." && pwd)
x86_venv=$work/device-venv
[ "$(id -u)" -eq 0 ] || die "must run as root (apt, mount, chroot)"
[ "$(uname -m)" = x86_64 ] || die "meant for an x86_64 host, this is $(uname -m)"
for f in "$edge_toml" "$windows" "$model_dir/manifest.json" "$x86_venv/bin/fedmfs-edge" "$work/pred.txt"; do
    [ -e "$f" ] || die "$f is missing: run step 1 of .ci/run first"
done
t_start=$(now)

# 1. host tools -------------------------------------------------------------------------------------
export DEBIAN_FRONTEND=noninteractive
pkgs=(qemu-user-static binfmt-support mmdebstrap time)
t=$(now)
if ! apt-get install -y -qq "${pkgs[@]}" > /dev/null; then
    apt-get update -qq && apt-get install -y -qq "${pkgs[@]}" > /dev/null || die "apt-get install ${pkgs[*]} failed"
fi
say "host tools (${pkgs[*]}) in $(since "$t") s"

# 2. binfmt_misc and qemu-aarch64 -------------------------------------------------------------------
bm=/proc/sys/fs/binfmt_misc
if [ ! -e "$bm/register" ]; then
    mount -t binfmt_misc binfmt_misc "$bm" || die "cannot mount binfmt_misc on $bm (kernel without CONFIG_BINFMT_MISC?)"
fi
if [ ! -e "$bm/qemu-aarch64" ] || ! grep -qx enabled "$bm/qemu-aarch64"; then
    update-binfmts --enable qemu-aarch64 || die "update-binfmts --enable qemu-aarch64 failed"
fi
grep -qx enabled "$bm/qemu-aarch64" || die "qemu-aarch64 is registered but not enabled in $bm"
grep -q '^flags:.*F' "$bm/qemu-aarch64" \
    || die "qemu-aarch64 is registered without the F flag: the emulator would not be found inside a chroot"
say "binfmt_misc: qemu-aarch64 enabled ($(grep '^interpreter' "$bm/qemu-aarch64"), $(grep '^flags' "$bm/qemu-aarch64"))"

# 3. the arm64 root ---------------------------------------------------------------------------------
tmp=$(mktemp -d /tmp/fedmfs-arm.XXXXXX)
root=$tmp/root
cleanup() {
    # the mounts live in the inside part's namespace and are gone with it; never delete through one
    if grep -qF " $root" /proc/self/mountinfo; then
        echo "arm smoke: mounts are left under $root, not deleting $tmp" >&2
    else
        rm -rf --one-file-system "$tmp"
    fi
}
trap cleanup EXIT

. /etc/os-release
suite=${VERSION_CODENAME:?no VERSION_CODENAME in /etc/os-release}
# the host's own apt sources (same mirror, and the release's updates), else mmdebstrap's default
mirror=()
if [ -s /etc/apt/sources.list.d/debian.sources ]; then
    mirror=(/etc/apt/sources.list.d/debian.sources)
elif [ -s /etc/apt/sources.list ] && grep -q '^deb ' /etc/apt/sources.list; then
    mirror=(/etc/apt/sources.list)
fi
t=$(now)
mmdebstrap --quiet --mode=root --variant=extract --architectures=arm64 \
    --include=python3-venv,libstdc++6,coreutils "$suite" "$root" "${mirror[@]}" \
    || die "mmdebstrap could not make the arm64 $suite root"
pyver=$(basename "$(readlink -f "$root/usr/bin/python3")")   # python3.11
pyver=${pyver#python}
[[ "$pyver" =~ ^3\.[0-9]+$ ]] || die "cannot tell the root's Python version (got '$pyver')"
say "arm64 $suite root (Python $pyver) extracted in $(since "$t") s, $(du -sh "$root" | cut -f1)"

# 4. wheels: the x86 device environment's exact versions, for aarch64 and the root's Python -------
t=$(now)
mkdir -p "$root/wheels" "$root/ci"
"$x86_venv/bin/python" -m pip freeze --exclude fedmfs > "$tmp/requirements.txt"
# the manylinux tags the root's glibc runs: pip does not widen an explicit --platform itself
glibc_minor=
for libc in "$root"/lib/aarch64-linux-gnu/libc.so.6 "$root"/usr/lib/aarch64-linux-gnu/libc.so.6; do
    if [ -f "$libc" ]; then
        glibc_minor=$(LC_ALL=C grep -ao 'GLIBC_2\.[0-9]\+' "$libc" | sort -t. -k2 -n -u | tail -n 1 | cut -d. -f2)
        break
    fi
done
[[ "$glibc_minor" =~ ^[0-9]+$ ]] || die "cannot tell the root's glibc version"
platforms=(--platform manylinux2014_aarch64)
for ((v = 17; v <= glibc_minor; v++)); do platforms+=(--platform "manylinux_2_${v}_aarch64"); done
python3 -m pip download --quiet --disable-pip-version-check --only-binary=:all: "${platforms[@]}" \
    --python-version "$pyver" --implementation cp -d "$root/wheels" -r "$tmp/requirements.txt" \
    2> >(sed "/is ignored: it is neither a file nor a directory/d" >&2) \
    || die "pip could not download aarch64 wheels of: $(tr '\n' ' ' < "$tmp/requirements.txt")"
python3 -m pip wheel --quiet --disable-pip-version-check --no-deps -w "$root/wheels" "$here" \
    2> >(sed "/is ignored: it is neither a file nor a directory/d" >&2) \
    || die "cannot build the fedmfs wheel"
say "wheels (glibc 2.$glibc_minor, cp${pyver/./}) in $(since "$t") s: $(ls "$root/wheels" | tr '\n' ' ')"

# 5. the same files at the same paths inside, a made-up ARM /proc/cpuinfo -------------------------
for p in "$(dirname "$edge_toml")" "$windows" "$model_dir"; do
    if [ ! -e "$root$p" ]; then
        mkdir -p "$root$(dirname "$p")"
        cp -a "$p" "$root$p"
    fi
done
cp "$here/.ci/device_check.py" "$here/.ci/arm_compare.py" "$root/ci/"
: > "$tmp/cpuinfo"
for ((i = 0; i < $(nproc); i++)); do
    printf 'processor\t: %d\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n' "$i" >> "$tmp/cpuinfo"
done

# 6. inside, under emulation ------------------------------------------------------------------------
t=$(now)
unshare --mount --fork bash "$here/.ci/arm_smoke.sh" --inside "$root" "$tmp" "$edge_toml" "$windows" "$model_dir" \
    || die "the aarch64 device path failed (see above)"
say "aarch64 part under emulation in $(since "$t") s"

# 7. the same on x86, and the comparison -------------------------------------------------------------
/usr/bin/time -v -o "$tmp/rss-predict-x86.txt" "$x86_venv/bin/fedmfs-edge" predict --config "$edge_toml" \
    --input "$windows" --json > "$tmp/predict-x86.json" || die "fedmfs-edge predict --json failed on x86"
/usr/bin/time -v -o "$tmp/rss-shapley-x86.txt" "$x86_venv/bin/python" "$here/.ci/device_check.py" "$model_dir" \
    "$windows" > /dev/null || die ".ci/device_check.py failed on x86"
"$x86_venv/bin/python" "$here/.ci/arm_compare.py" dump "$model_dir" "$windows" > "$tmp/dump-x86.json" \
    || die "arm_compare.py dump failed on x86"
python3 "$here/.ci/arm_compare.py" compare "$tmp/dump-x86.json" "$tmp/dump-arm.json" "$tmp/predict-x86.json" \
    "$tmp/predict-arm.json" "$work/pred.txt" --tol 1e-5 || die "the aarch64 numbers are not those of x86 within 1e-5"

rss() { awk -F': ' '/Maximum resident set size/ { printf "%.0f MiB", $2 / 1024 }' "$1"; }
say "aarch64 base install: venv $(awk '{ printf "%.0f MiB", $1 / 1024 }' "$tmp/venv-kb"), wheels $(du -sh "$root/wheels" | cut -f1)"
say "peak RSS: predict $(rss "$tmp/rss-predict-arm.txt") aarch64 under qemu / $(rss "$tmp/rss-predict-x86.txt") x86;" \
    "Shapley check $(rss "$tmp/rss-shapley-arm.txt") under qemu / $(rss "$tmp/rss-shapley-x86.txt") x86"
say "aarch64 device path ok: predict and Shapley equal x86 within 1e-5; step time $(since "$t_start") s"
