#!/usr/bin/env bash
# get_fashion_mnist.sh OUTDIR [SOURCE]: puts the four Fashion-MNIST IDX files, decompressed, in
# OUTDIR (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte,
# t10k-labels-idx1-ubyte) and says where they came from.
#
#   - SOURCE (or the environment variable FASHION_MNIST_DIR): a folder holding the four files,
#     gzip-compressed (NAME.gz) or not;
#   - else a download from the data set's canonical address, when the network allows (short
#     timeouts; GET_DATA_OFFLINE=1 skips it);
#   - else the copy of the Debian package dataset-fashion-mnist, /usr/share/datasets/fashion-mnist.
#
# Whatever the source, every decompressed file is checked against its sha256 below: those of the
# files the data set's authors published, as found in the Debian package (the checksums are of
# the decompressed files, so a recompressed copy passes). A file that does not match is refused.
set -euo pipefail

URL=http://fashion-mnist.s3-website.eu-central-1.amazonaws.com
DEBIAN=/usr/share/datasets/fashion-mnist
NAMES="train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte"
declare -A SHA256=(
    [train-images-idx3-ubyte]=c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888
    [train-labels-idx1-ubyte]=bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9
    [t10k-images-idx3-ubyte]=5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b
    [t10k-labels-idx1-ubyte]=0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34
)

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 OUTDIR [SOURCE]" >&2
    exit 1
fi
OUTDIR=$1
SOURCE=${2:-${FASHION_MNIST_DIR:-}}
mkdir -p "$OUTDIR" || { echo "get_fashion_mnist: cannot create $OUTDIR" >&2; exit 1; }
TMP=$(mktemp -d "$OUTDIR/.download.XXXXXX")
trap 'rm -rf "$TMP"' EXIT

# copy_from DIR: the four files of DIR (NAME or NAME.gz) into $TMP, decompressed; 1 if one is missing
copy_from() {
    for name in $NAMES; do
        if [ -f "$1/$name" ]; then cp "$1/$name" "$TMP/$name"
        elif [ -f "$1/$name.gz" ]; then gzip -dc "$1/$name.gz" > "$TMP/$name"
        else return 1; fi
    done
}

download() {
    [ "${GET_DATA_OFFLINE:-0}" != 1 ] || return 1
    for name in $NAMES; do
        if command -v curl > /dev/null; then
            curl -fsSL --connect-timeout 5 --max-time 300 -o "$TMP/$name.gz" "$URL/$name.gz" 2> /dev/null ||
                return 1
        elif command -v wget > /dev/null; then
            wget -q -T 10 -t 1 -O "$TMP/$name.gz" "$URL/$name.gz" 2> /dev/null || return 1
        else
            return 1
        fi
        gzip -dc "$TMP/$name.gz" > "$TMP/$name" && rm "$TMP/$name.gz" || return 1
    done
}

if [ -n "$SOURCE" ]; then
    if ! copy_from "$SOURCE"; then
        echo "get_fashion_mnist: $SOURCE lacks one of: $NAMES (or NAME.gz)" >&2
        exit 1
    fi
    origin="a copy of $SOURCE"
elif download; then
    origin="downloaded from $URL"
elif [ -d "$DEBIAN" ] && copy_from "$DEBIAN"; then
    origin="a copy of $DEBIAN (Debian package dataset-fashion-mnist)"
else
    echo "get_fashion_mnist: no Fashion-MNIST: the download from $URL failed and $DEBIAN is missing" >&2
    echo "  (Debian: apt-get install dataset-fashion-mnist; or pass a folder with the four files)" >&2
    exit 1
fi
for name in $NAMES; do
    if [ "$(sha256sum "$TMP/$name" | cut -d' ' -f1)" != "${SHA256[$name]}" ]; then
        echo "get_fashion_mnist: $name ($origin) has the wrong sha256: not the published Fashion-MNIST" >&2
        exit 1
    fi
done
for name in $NAMES; do mv "$TMP/$name" "$OUTDIR/$name"; done
echo "get_fashion_mnist: $OUTDIR: Fashion-MNIST, $origin (sha256 checked)"
