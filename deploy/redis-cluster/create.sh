#!/bin/sh
# Forms the compose file's Redis Cluster, once: the redis-cluster-init service runs it when
# every node answers. NODES lists the nodes as host:port, the primaries first; REPLICAS is
# the number of replicas per primary. A cluster already formed (the nodes keep nodes.conf
# on their volumes) is left as it is.
#
# Usable outside compose too: NODES="10.0.0.1:6379 10.0.0.2:6379 10.0.0.3:6379" REPLICAS=0 sh create.sh
set -eu

NODES="${NODES:?set NODES to the nodes as host:port, primaries first}"
REPLICAS="${REPLICAS:-0}"
TRIES="${TRIES:-60}"  # seconds to wait for cluster_state:ok on every node

info() {  # CLUSTER INFO of node $1 (host:port), without the \r of its lines
    redis-cli -h "${1%:*}" -p "${1##*:}" cluster info | tr -d '\r'
}

first="${NODES%% *}"
known="$(info "$first" | sed -n 's/^cluster_known_nodes://p')"
if [ -z "$known" ]; then
    echo "$first does not answer CLUSTER INFO: is it up, with cluster-enabled yes?" >&2
    exit 1
fi
if [ "$known" != 1 ]; then
    echo "the cluster is formed already ($first knows $known nodes): nothing to do"
    exit 0
fi

# redis-cli --cluster create takes addresses, not names (Redis 7.0).
addresses=""
for node in $NODES; do
    ip="$(getent hosts "${node%:*}" | awk '{ print $1; exit }')"
    if [ -z "$ip" ]; then
        echo "cannot resolve ${node%:*}" >&2
        exit 1
    fi
    addresses="$addresses $ip:${node##*:}"
done

# shellcheck disable=SC2086 # one argument per address
redis-cli --cluster create $addresses --cluster-replicas "$REPLICAS" --cluster-yes

for node in $NODES; do
    tries=0
    until info "$node" | grep -q '^cluster_state:ok'; do
        tries=$((tries + 1))
        if [ "$tries" -gt "$TRIES" ]; then
            echo "$node did not report cluster_state:ok within ${TRIES} s" >&2
            exit 1
        fi
        sleep 1
    done
done
echo "cluster formed: $(info "$first" | grep -E '^cluster_(size|known_nodes)' | tr '\n' ' ')"
