#!/usr/bin/env bash
# Set-up for the browser test (tests/browser/): Debian's chromium + chromium-driver (apt), Node.js if absent,
# and playwright-core from npm (tests/browser/node_modules, git-ignored). Playwright never downloads a browser:
# it drives /usr/bin/chromium. Idempotent: a second run only checks what is there (no network).
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1

missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
[ -d /usr/share/fonts/truetype/dejavu ] || missing+=(fonts-dejavu-core)  # readable text in screenshots
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  echo "setup_browser: apt-get install ${missing[*]}"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq -o=Dpkg::Use-Pty=0 --no-install-recommends "${missing[@]}" >/tmp/perfusion-apt.log 2>&1 \
    || { tail -n 40 /tmp/perfusion-apt.log >&2; exit 1; }
fi

major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 18 ]; then
  echo "setup_browser: Node.js $(node -v) is too old (playwright-core needs 18+)" >&2
  exit 1
fi

cd tests/browser
stamp=node_modules/.perfusion-stamp
digest() { cat package.json $( [ -f package-lock.json ] && echo package-lock.json ) | sha256sum | cut -c1-16; }
if [ "$(cat "$stamp" 2>/dev/null)" != "$(digest)" ] || [ ! -d node_modules/playwright-core ]; then
  if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  else
    npm install --no-audit --no-fund --loglevel=error
  fi
  digest > "$stamp"
fi
echo "setup_browser: $(/usr/bin/chromium --version 2>/dev/null || echo 'chromium ?'), node $(node -v), playwright-core $(node -p 'require("./node_modules/playwright-core/package.json").version')"
