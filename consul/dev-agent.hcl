# A single-node Consul for a development cluster of cronsul agents, with ACLs on so the
# agent token and consul/acl-policy.hcl are exercised as in production.
#
#   consul agent -config-file=consul/dev-agent.hcl
#   consul acl bootstrap                      # once; prints the management token
#   (then docs/operations.md, "Consul ACLs", to create the cronsul policy and token)
#
# Several cronsul agents can share this one Consul agent: each has its own [agent] node and so
# its own service cronsul-<node>. For per-node maintenance tests use the Consul dev server
# (devconsul.testing.DevConsul.add_agent) or one Consul client agent per node.

node_name      = "dev-consul"
datacenter     = "dev"
data_dir       = "/tmp/cronsul-consul-dev"
server         = true
bootstrap_expect = 1
bind_addr      = "127.0.0.1"
client_addr    = "127.0.0.1"
log_level      = "INFO"

ui_config {
  enabled = true
}

ports {
  http = 8500
  grpc = 8502
}

# Session TTLs down to Consul's minimum, 10 s, are fine in development.
session_ttl_min = "10s"

acl {
  enabled                  = true
  default_policy           = "deny"
  enable_token_persistence = true
}
