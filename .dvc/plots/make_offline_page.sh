#!/usr/bin/env bash
# Rebuilds offline.html, the page `dvc plots show` writes (.dvc/config: plots.html_template):
# DVC's own page with vega, vega-lite and vega-embed inlined instead of loaded from a CDN, so the
# plots render with no network. The versions are the ones dvc-render loads. Needs npm.
set -euo pipefail
cd "$(dirname "$0")"
PACKAGES=(vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack -q "${PACKAGES[@]}" >/dev/null)

inline() {  # package@version -> <script> with its minified UMD build (it sets a global)
  local name=${1%@*} version=${1#*@}
  tar xzf "$tmp/$name-$version.tgz" -C "$tmp" package/build/"$name".min.js package/LICENSE
  echo "<script>/* $name $version, $(head -n 1 "$tmp/package/LICENSE") (see its LICENSE) */"
  sed 's|//# sourceMappingURL=.*||' "$tmp/package/build/$name.min.js"
  echo "</script>"
  rm -rf "$tmp/package"
}

{
  echo '<!DOCTYPE html>'
  echo '<html>'
  echo '<head>'
  echo '    {refresh_tag}'
  echo '    <title>DVC Plot</title>'
  for p in "${PACKAGES[@]}"; do inline "$p"; done
  echo '    <style>'
  echo '        table { border-spacing: 15px; }'
  echo '    </style>'
  echo '</head>'
  echo '<body>'
  echo '    {plot_divs}'
  echo '</body>'
  echo '</html>'
} > offline.html.tmp
mv offline.html.tmp offline.html
