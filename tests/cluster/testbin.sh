echo "testbin: not yet"; mkdir -p "$TESTBIN_CACHE"; : > "$TESTBIN_CACHE/env.sh"
