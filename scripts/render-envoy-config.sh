#!/usr/bin/env bash
# Render an Envoy config template from envoy/ by substituting its placeholders.
#
#   scripts/render-envoy-config.sh TEMPLATE KEY=VALUE... [> rendered.yaml]
#   scripts/render-envoy-config.sh -o OUT TEMPLATE KEY=VALUE...
#
# Placeholders are written ${KEY} with KEY in [A-Z][A-Z0-9_]* (for example ${LISTEN_PORT}).
# Every placeholder outside comment lines must get a value, or this exits 1 naming the ones
# left; keys that the template does not use are ignored, so a test can pass one set of
# values to every template. Values are inserted verbatim (no YAML quoting).
# Pure bash: other languages can do the same with a plain string replace of "${KEY}".
set -euo pipefail

out=""
if [ "${1:-}" = "-o" ]; then
  out=${2:?"-o needs a file"}
  shift 2
fi
template=${1:?"usage: render-envoy-config.sh [-o OUT] TEMPLATE KEY=VALUE..."}
shift
[ -r "$template" ] || { echo "render-envoy-config: cannot read template '$template'" >&2; exit 2; }

content=$(cat "$template"; echo x)   # the x keeps trailing newlines through $(...)
content=${content%x}

for pair in "$@"; do
  case "$pair" in
    [A-Z]*=*) ;;
    *) echo "render-envoy-config: '$pair' is not KEY=VALUE with an upper-case KEY" >&2; exit 2 ;;
  esac
  key=${pair%%=*}
  value=${pair#*=}
  content=${content//"\${$key}"/$value}
done

left=$(printf '%s' "$content" | grep -v '^[[:space:]]*#' | grep -o '\${[A-Z][A-Z0-9_]*}' | sort -u | tr '\n' ' ' || true)
if [ -n "$left" ]; then
  echo "render-envoy-config: $template: no value given for: $left(pass KEY=VALUE for each)" >&2
  exit 1
fi

if [ -n "$out" ]; then
  printf '%s' "$content" > "$out"
else
  printf '%s' "$content"
fi
