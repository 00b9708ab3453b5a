# Consul ACL policy for the cronsul agent token: least privilege. One token per host (or one
# shared token); create it as shown in docs/operations.md, "Consul ACLs".
#
# If [consul] prefix is not "cronsul", change the key_prefix below to match.

# The leader lock (<prefix>/leader), paused jobs (<prefix>/paused/<job>) and the published
# schedule (<prefix>/schedule). Nothing outside the prefix.
key_prefix "cronsul/" {
  policy = "write"
}

# Create, renew and destroy the agent's own session (named cronsul-<node>) on its Consul node,
# and list that node's sessions to destroy a crashed predecessor's.
session_prefix "" {
  policy = "write"
}

# Register/deregister cronsul-<node>, pass its TTL check, and (cronsul drain / undrain) toggle
# its service maintenance. Also reads `cronsul status` needs (health of every cronsul service).
service_prefix "cronsul" {
  policy = "write"
}

# Health and catalog reads (the session's serfHealth check, /v1/health/service/cronsul).
node_prefix "" {
  policy = "read"
}

# /v1/agent/self (the Consul node name) and /v1/agent/checks (maintenance detection).
agent_prefix "" {
  policy = "read"
}

# Not granted, on purpose: node maintenance (`consul maint`) needs node write: that is the
# operator's token, not the agent's. ACL administration, other keys, other services: none.
