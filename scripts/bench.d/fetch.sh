#!/bin/sh
# The one measured command, identical under every tool (nsvpn, proxychains4, tsocks, pasta, ...).
#   fetch.sh bulk URL sha256|size        one download; body hashed by sha256sum or dropped
#   fetch.sh reqs URL N one-curl|loop    N sequential requests, a fresh TCP connection each
#   fetch.sh xrd ROOT-URL                one xrdcp download, its bytes counted by wc
# Results go to stderr as marker lines that scripts/bench parses:
#   CURL <http_code> <size_download> <time_total> <num_connects>   (one per transfer)
#   SHA256 <hex>                 sha256 of all bodies concatenated (when hashed)
#   WALL <t0> <t1>               epoch seconds around the requests
mode=$1 url=$2
fmt='%{stderr}CURL %{http_code} %{size_download} %{time_total} %{num_connects}\n'
case $mode in
bulk)
	if [ "$3" = sha256 ]; then
		h=$(curl -sS --connect-timeout 20 -w "$fmt" "$url" | sha256sum)
		echo "SHA256 ${h%% *}" >&2
	else
		curl -sS --connect-timeout 20 -o /dev/null -w "$fmt" "$url"
	fi
	;;
reqs)
	n=$3
	t0=$(date +%s.%N)
	if [ "$4" = loop ]; then
		h=$(i=0; while [ $i -lt "$n" ]; do
			curl -sS --connect-timeout 20 -w "$fmt" "$url"; i=$((i + 1)); done | sha256sum)
	else
		set --
		i=0
		while [ $i -lt "$n" ]; do set -- "$@" "$url"; i=$((i + 1)); done
		# Connection: close makes nginx close after each response: every request is a new
		# connect() through the tool (what the request-rate goal is about), checked by num_connects
		h=$(curl -sS --connect-timeout 20 -H 'Connection: close' -w "$fmt" "$@" | sha256sum)
	fi
	t1=$(date +%s.%N)
	echo "SHA256 ${h%% *}" >&2
	echo "WALL $t0 $t1" >&2
	;;
xrd)
	# XRootD's client (AF_INET6 sockets, non-blocking connects in an epoll poller thread);
	# reported like a curl transfer, "200" when xrdcp succeeded
	t0=$(date +%s.%N)
	got=$( (xrdcp --nopbar -f "$url" - || echo "XRDCP_FAILED" >&2) | wc -c)
	t1=$(date +%s.%N)
	echo "CURL 200 $got $(echo "$t0 $t1" | awk '{printf "%.6f", $2 - $1}') 1" >&2
	;;
*)
	echo "usage: fetch.sh bulk URL sha256|size | fetch.sh reqs URL N one-curl|loop |" \
		"fetch.sh xrd ROOT-URL" >&2
	exit 2
	;;
esac
