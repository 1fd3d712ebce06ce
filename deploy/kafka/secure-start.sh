#!/bin/sh
# Starts the compose file's Kafka the way `recstream stack up --secure` starts the local one
# (cli/stack.py): SASL/SCRAM-SHA-512 for clients, SASL/PLAIN between broker and controller, both
# as `admin` (the only super user), the standard authorizer, and nothing allowed where no ACL says
# so. The admin password comes from the mounted secret; it is written only into files this user
# alone reads, and never printed. `recstream access kafka` then adds the other principals.
set -eu

secret=/run/secrets/recstream/kafka/admin
[ -s "$secret" ] || { echo "no admin secret at $secret" >&2; exit 1; }
password=$(cat "$secret")
data=/var/lib/kafka/data
conf=/tmp/recstream-kafka
umask 077
mkdir -p "$conf"

cat >"$conf/server.properties" <<EOF
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=kafka:9093
listeners=SASL_PLAINTEXT://:9092,CONTROLLER://:9093
advertised.listeners=SASL_PLAINTEXT://kafka:9092
controller.listener.names=CONTROLLER
inter.broker.listener.name=SASL_PLAINTEXT
listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT
sasl.enabled.mechanisms=SCRAM-SHA-512
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.sasl_plaintext.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$password";
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required username="admin" password="$password" user_admin="$password";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin
log.dirs=$data
num.partitions=${KAFKA_NUM_PARTITIONS:-4}
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
EOF

# What the health check connects with.
cat >"$conf/admin-client.properties" <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="admin" password="$password";
EOF

if [ ! -f "$data/meta.properties" ]; then
  cluster_id=$(/opt/kafka/bin/kafka-storage.sh random-uuid)
  /opt/kafka/bin/kafka-storage.sh format --standalone --cluster-id "$cluster_id" \
    --config "$conf/server.properties" \
    --add-scram "SCRAM-SHA-512=[name=admin,password=$password]" >/dev/null
fi
exec /opt/kafka/bin/kafka-server-start.sh "$conf/server.properties"
