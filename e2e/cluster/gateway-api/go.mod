// The Gateway API release whose CRDs (experimental channel, which includes the standard
// ones) `sluice-e2e cluster up` installs on the test ground: read from the module cache
// (`go mod download -json sigs.k8s.io/gateway-api` here gives its directory).
module sluice.dev/e2e/cluster/gateway-api

go 1.25.0

require sigs.k8s.io/gateway-api v1.4.1
