# checks.sh: what the test scripts share, sourced after they set TMP (a temporary folder). Each
# check prints one line; the script ends with `finish`, which prints "N passed, M failed" and
# exits 1 if any check failed.
passed=0
failed=0

pass() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1"; failed=$((failed + 1)); }
check() {  # check DESCRIPTION COMMAND...: passes if the command succeeds
    local what=$1
    shift
    if "$@" > "$TMP/last.log" 2>&1; then pass "$what"
    else fail "$what"; sed 's/^/     /' "$TMP/last.log" | tail -5; fi
}
refuses() {  # refuses DESCRIPTION EXPECTED-TEXT COMMAND...: the command must fail, saying EXPECTED-TEXT
    local what=$1 expected=$2
    shift 2
    local out said
    if out=$("$@" 2>&1); then fail "$what (exit 0)"; return; fi
    said=$(grep -F -- "$expected" <<< "$out" | head -1 | cut -c1-110)
    if [[ -n $said ]]; then pass "$what: $said"
    else fail "$what (no '$expected' in: $(tail -1 <<< "$out"))"; fi
}
finish() {
    echo "$passed passed, $failed failed"
    [[ $failed -eq 0 ]]
}
