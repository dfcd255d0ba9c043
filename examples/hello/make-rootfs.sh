#!/bin/sh
# Builds ./rootfs, a minimal root filesystem around Debian's static busybox, for the example's
# base image. kiln bakes it with `base = "dir:./rootfs"`.
set -eu
cd "$(dirname "$0")"

busybox=$(command -v busybox || true)
if [ -z "$busybox" ] || ldd "$busybox" >/dev/null 2>&1; then
  echo "need a static busybox: apt-get install busybox-static" >&2
  exit 1
fi

rm -rf rootfs
mkdir -p rootfs/bin rootfs/etc rootfs/root rootfs/tmp rootfs/var/www
cp "$busybox" rootfs/bin/busybox
for app in sh cat echo env id ls mkdir rm sleep httpd wget; do
  ln -s busybox "rootfs/bin/$app"
done
echo 'root:x:0:0:root:/root:/bin/sh' > rootfs/etc/passwd
echo 'root:x:0:' > rootfs/etc/group
chmod 1777 rootfs/tmp
