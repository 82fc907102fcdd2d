#!/bin/sh
# Creates the Clearhouse topics before any relay or consumer starts (the broker runs with
# auto-creation off, so a typo in a topic name fails loudly instead of making a new topic).
# Topics and partition count come from docker-compose.yml (CLEARHOUSE_TOPICS, PARTITIONS);
# the partition count bounds how many consumer replicas of one group can share the work.
# Idempotent: --if-not-exists, so a second `docker compose up` changes nothing.
set -e

for topic in $CLEARHOUSE_TOPICS; do
  /opt/kafka/bin/kafka-topics.sh --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" --create --if-not-exists \
    --topic "$topic" --partitions "$PARTITIONS" --replication-factor 1
done
/opt/kafka/bin/kafka-topics.sh --bootstrap-server "$KAFKA_BOOTSTRAP_SERVERS" --describe
