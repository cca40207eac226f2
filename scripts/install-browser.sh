#!/usr/bin/env bash
# Install headless Chromium and its WebDriver from Debian for the monitor's browser test.
#
# Idempotent and quiet: does nothing when both are present. Never fails the build: where apt is
# missing or not usable (not root, no network), it says so and exits 0, and the browser test
# then skips with the reason. Debian's chromium and chromium-driver are built together, so their
# versions always match (a driver downloaded at test time would not, and cannot be fetched here).
set -u

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    exit 0
fi
if ! have apt-get; then
    echo "install-browser: apt-get not found; install Chromium and chromedriver yourself to run the browser test" >&2
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if have sudo && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install-browser: not root and no passwordless sudo; run: apt-get install chromium chromium-driver" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
log="$(mktemp -t install-browser.XXXXXX)"
# Refresh the package lists only when the packages are unknown (a fresh machine), to stay fast.
if ! apt-cache show chromium chromium-driver >/dev/null 2>&1; then
    $SUDO apt-get update -qq >"$log" 2>&1 || true
fi
if $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver >>"$log" 2>&1; then
    echo "install-browser: installed $(chromium --version 2>/dev/null || echo chromium)"
else
    echo "install-browser: apt-get install chromium chromium-driver failed (see $log); the browser test will skip" >&2
    exit 0
fi
rm -f "$log"
