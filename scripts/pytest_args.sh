# Sourced by scripts/test.sh: `pytest_args "$@"` prints, one per line, the arguments pytest gets: the caller's,
# preceded by `-q` unless they already set the verbosity (-q, -v, -qq, -vv, --quiet, --verbose, --verbosity=N,
# or a combined short flag such as -xq). An extra `-q` on top of ours made it -qq, which drops pytest's summary
# line ("N passed in Ts").
pytest_args() {
    local a own=1
    for a in "$@"; do
        if [[ "$a" =~ ^-[A-Za-z]*[qv][A-Za-z]*$ || "$a" =~ ^--(quiet|verbose|verbosity)(=.*)?$ ]]; then
            own=0
        fi
    done
    if [[ $own == 1 ]]; then
        printf '%s\n' -q
    fi
    for a in "$@"; do
        printf '%s\n' "$a"
    done
}
