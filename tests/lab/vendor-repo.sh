#!/usr/bin/env bash
# A vendor's apt repository, made from nothing, as a test needs one:
# DIR/www/repo/ (one package, kiln-vendor-hello 1.0, in `stable main`,
# signed), DIR/www/unsigned/ (the same without its signature),
# DIR/vendor.asc (the key it is signed with) and DIR/other.asc (a key that
# signs nothing). Uses dpkg-deb, apt-ftparchive (apt-utils) and gpg; any
# gpg-agent it starts is stopped before it exits.
set -euo pipefail
dir=$1
mkdir -p "$dir"
cd "$dir"
homes=()
# On exit, whatever happened: stop the gpg-agent each home may have started.
# A home whose agent never started (gpg failed before) has nothing to stop,
# and gpgconf says so with an error; that must not hide the script's own
# exit status, which the test checks.
cleanup() { for h in "${homes[@]}"; do gpgconf --homedir "$h" --kill all 2>/dev/null || true; done; }
trap cleanup EXIT

mkdir -p pkg/DEBIAN pkg/usr/share/kiln-vendor-hello
cat > pkg/DEBIAN/control <<'CONTROL'
Package: kiln-vendor-hello
Version: 1.0
Architecture: all
Maintainer: kiln tests <tests@kiln.invalid>
Description: a package from a vendor's own repository
CONTROL
echo "hello from the vendor" > pkg/usr/share/kiln-vendor-hello/hello
mkdir -p www/repo/pool www/repo/dists/stable/main/binary-amd64
dpkg-deb --root-owner-group -Zgzip --build pkg www/repo/pool/kiln-vendor-hello_1.0_all.deb >/dev/null

for who in vendor other; do
  home=$dir/gpg-$who
  mkdir -m 0700 "$home"
  homes+=("$home")
  gpg --homedir "$home" --batch --quiet --passphrase '' --quick-gen-key "kiln $who <$who@kiln.invalid>" ed25519 sign never
  gpg --homedir "$home" --armor --export > "$who.asc"
done

cd www/repo
apt-ftparchive packages pool > dists/stable/main/binary-amd64/Packages
apt-ftparchive -o APT::FTPArchive::Release::Suite=stable -o APT::FTPArchive::Release::Codename=stable \
  -o APT::FTPArchive::Release::Architectures=amd64 -o APT::FTPArchive::Release::Components=main \
  release dists/stable > dists/stable/Release.tmp
mv dists/stable/Release.tmp dists/stable/Release
cp -r . ../unsigned
gpg --homedir "$dir/gpg-vendor" --batch --quiet --yes --clearsign -o dists/stable/InRelease dists/stable/Release
