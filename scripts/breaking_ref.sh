#!/bin/sh
# Prints the git ref whose proto/ the current proto/ must stay compatible with (`buf breaking`):
# HEAD's when proto/ has changes not yet committed; otherwise the parent (first-parent
# history, so a merge compares with the branch it lands on) of the last commit that changed
# proto/; HEAD when there is no such parent (a one-commit history or a shallow clone).
cd "$(dirname "$0")/.." || exit 1
if [ -n "$(git status --porcelain -- proto)" ]; then echo HEAD; exit 0; fi
last=$(git log -1 --first-parent --format=%H -- proto)
if [ -n "$last" ] && git rev-parse --verify --quiet "$last~1^{commit}" >/dev/null; then
  echo "$last~1"
else
  echo HEAD
fi
