#!/usr/bin/env bash
# Sharing engines through DVC, with a local folder remote: a project holding a registry (a tarball of
# artifacts/registry from a GPU session, bench/device_session.sh digits) `dvc add`s and `dvc push`es it;
# a fresh `git clone` of that project `dvc pull`s it and `trtpipe artifacts verify` checks it; the pulled
# registry is copied to DEST (build/pulled) for the GPU call that loads it (device_session.sh fleet).
# usage: bench/fleet_dvc.sh REGISTRY.tgz DEST LOG
set -euo pipefail
TGZ=$(realpath "$1"); DEST=$(realpath -m "$2"); LOG=$(realpath -m "$3")
W=$(mktemp -d /tmp/fleet-XXXX)
G=(git -c user.email=ci@trtpipe -c user.name=trtpipe)
{
  mkdir -p "$W/proj" && cd "$W/proj" && git init -q && dvc init -q
  tar xzf "$TGZ" artifacts/registry
  dvc add -q artifacts/registry
  dvc remote add -q -d local "$W/remote"
  "${G[@]}" add -A && "${G[@]}" commit -qm "registry with engines"
  dvc push
  echo "remote: $(find "$W/remote" -type f | wc -l) files"
  "${G[@]}" clone -q "$W/proj" "$W/clone" && cd "$W/clone"
  test ! -e artifacts/registry && echo "clone: no artifacts/registry before dvc pull (DVC's, not git's)"
  dvc pull
  trtpipe artifacts verify --integrity-only --registry artifacts/registry
  trtpipe artifacts verify --registry artifacts/registry || echo "(verify against this machine: rc $?; no GPU here)"
  rm -rf "$DEST" && mkdir -p "$DEST/artifacts" && cp -r artifacts/registry "$DEST/artifacts/"
  echo "pulled into $DEST"
} 2>&1 | tee "$LOG"
