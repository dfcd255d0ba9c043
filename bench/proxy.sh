#!/usr/bin/env bash
# kiln's reverse proxy against nginx as a reverse proxy, side by side on loopback.
#
#   bench/proxy.sh            # needs wrk and nginx: apt-get install wrk nginx-light
#
# One upstream (nginx serving a 1 KiB static file on 127.0.0.1:18081) behind two proxies:
# kiln's (kiln-proxy-bench, the real proxy code, on :18080) and nginx (proxy_pass with an
# upstream keepalive pool of 64, on :18082, one worker per core). wrk drives each in turn, the
# order alternating between rounds; the script prints every run, then medians and ratios.
# Everything listens on 127.0.0.1 only and every run is bounded in time.
#
# Knobs (environment): ROUNDS (3), DURATION (10s), CONNS (64), THREADS (2).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNS=${CONNS:-64}
THREADS=${THREADS:-2}
KILN_PORT=18080
UP_PORT=18081
NGINX_PORT=18082
ROOT=$(cd "$(dirname "$0")/.." && pwd)

PATH="$PATH:/usr/sbin:/sbin"
for tool in wrk nginx; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: $tool not found; install it with: apt-get install wrk nginx-light" >&2
        exit 1
    fi
done

for port in $KILN_PORT $UP_PORT $NGINX_PORT; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "error: something already listens on 127.0.0.1:$port" >&2
        exit 1
    fi
done

echo "building kiln-proxy-bench (release)..." >&2
(cd "$ROOT" && cargo build --release --quiet -p kiln-proxy --bin kiln-proxy-bench)
BIN="$ROOT/target/release/kiln-proxy-bench"

TMP=$(mktemp -d)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT

mkdir -p "$TMP/www" "$TMP/up" "$TMP/px"
# nginx workers run as an unprivileged user when started as root: let them read the site.
chmod 755 "$TMP" "$TMP/www"
head -c 768 /dev/urandom | base64 -w 0 | head -c 1024 >"$TMP/www/index.html"
chmod 644 "$TMP/www/index.html"

# Temp paths of their own, so nginx needs nothing from /var/lib/nginx.
temp_paths() {
    local d=$1
    cat <<CONF
    client_body_temp_path $d/client_body;
    proxy_temp_path $d/proxy;
    fastcgi_temp_path $d/fastcgi;
    uwsgi_temp_path $d/uwsgi;
    scgi_temp_path $d/scgi;
CONF
}

cat >"$TMP/up/nginx.conf" <<CONF
daemon off;
worker_processes 1;
pid $TMP/up/nginx.pid;
error_log $TMP/up/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
$(temp_paths "$TMP/up")
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$UP_PORT;
        location / { root $TMP/www; }
    }
}
CONF

cat >"$TMP/px/nginx.conf" <<CONF
daemon off;
worker_processes $(nproc);
pid $TMP/px/nginx.pid;
error_log $TMP/px/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
$(temp_paths "$TMP/px")
    keepalive_requests 1000000;
    upstream app {
        server 127.0.0.1:$UP_PORT;
        keepalive 64;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
CONF

# Waits (at most 10 s) until a GET through 127.0.0.1:$1 answers 200.
wait_ok() {
    local port=$1 i line
    for i in $(seq 100); do
        # In a subshell: a failed `exec` would end the script itself.
        line=$( (exec 3<>"/dev/tcp/127.0.0.1/$port" &&
            printf 'GET /index.html HTTP/1.0\r\nHost: bench\r\n\r\n' >&3 &&
            timeout 2 head -n 1 <&3) 2>/dev/null || true)
        [[ $line == *" 200 "* ]] && return 0
        sleep 0.1
    done
    echo "error: nothing answers 200 on 127.0.0.1:$port" >&2
    exit 1
}

nginx -p "$TMP/up" -e "$TMP/up/error.log" -c "$TMP/up/nginx.conf" &
PIDS+=($!)
wait_ok $UP_PORT
"$BIN" --listen "127.0.0.1:$KILN_PORT" "127.0.0.1:$UP_PORT" 2>"$TMP/kiln.log" &
PIDS+=($!)
wait_ok $KILN_PORT
nginx -p "$TMP/px" -e "$TMP/px/error.log" -c "$TMP/px/nginx.conf" &
PIDS+=($!)
wait_ok $NGINX_PORT

# One wrk run; prints "requests_per_second p99_ms".
run() {
    local port=$1 duration=$2 out
    out=$(timeout 120 wrk -t"$THREADS" -c"$CONNS" -d"$duration" --latency "http://127.0.0.1:$port/index.html")
    if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then
        echo "warning: errors on :$port: $(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr -s ' ')" >&2
    fi
    awk '
        /Requests\/sec:/ { rps = $2 }
        $1 == "99%" {
            v = $2
            if (v ~ /us$/) { sub(/us$/, "", v); p99 = v / 1000 }
            else if (v ~ /ms$/) { sub(/ms$/, "", v); p99 = v }
            else if (v ~ /s$/) { sub(/s$/, "", v); p99 = v * 1000 }
        }
        END { printf "%.0f %.3f\n", rps, p99 }' <<<"$out"
}

median() { sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" >&2
echo "warm-up (2 s each)..." >&2
run $KILN_PORT 2s >/dev/null
run $NGINX_PORT 2s >/dev/null

: >"$TMP/kiln.txt"
: >"$TMP/nginx.txt"
for round in $(seq "$ROUNDS"); do
    if ((round % 2)); then order="kiln nginx"; else order="nginx kiln"; fi
    for who in $order; do
        if [[ $who == kiln ]]; then port=$KILN_PORT; else port=$NGINX_PORT; fi
        result=$(run $port "$DURATION")
        echo "$result" >>"$TMP/$who.txt"
        printf 'round %d  %-5s  %8s req/s  p99 %s ms\n' "$round" "$who" ${result}
    done
done

k_rps=$(cut -d' ' -f1 "$TMP/kiln.txt" | median)
n_rps=$(cut -d' ' -f1 "$TMP/nginx.txt" | median)
k_p99=$(cut -d' ' -f2 "$TMP/kiln.txt" | median)
n_p99=$(cut -d' ' -f2 "$TMP/nginx.txt" | median)
echo
echo "median of $ROUNDS rounds (wrk -t$THREADS -c$CONNS -d$DURATION --latency):"
printf '  kiln   %8.0f req/s   p99 %7.3f ms\n' "$k_rps" "$k_p99"
printf '  nginx  %8.0f req/s   p99 %7.3f ms\n' "$n_rps" "$n_p99"
awk -v a="$k_rps" -v b="$n_rps" -v c="$k_p99" -v d="$n_p99" \
    'BEGIN { printf "  kiln/nginx: throughput %.2fx, p99 %.2fx\n", a / b, c / d }'
