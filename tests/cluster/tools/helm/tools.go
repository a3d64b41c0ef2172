//go:build tools

// Package tools pins the helm CLI that the end-to-end tests install charts with.
package tools

import _ "helm.sh/helm/v3/cmd/helm"
