{{- define "wiproxy.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wiproxy.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "wiproxy.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wiproxy.secretName" -}}
{{- default (printf "%s-tls" (include "wiproxy.fullname" .)) .Values.certs.secretName -}}
{{- end -}}

{{- define "wiproxy.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "wiproxy.sidecarImage" -}}
{{- printf "%s:%s" .Values.sidecar.image.repository (default .Chart.AppVersion .Values.sidecar.image.tag) -}}
{{- end -}}

{{/* Namespaces never sent to the webhooks. */}}
{{- define "wiproxy.excludedNamespaces" -}}
{{- $namespaces := list "kube-system" "kube-public" "kube-node-lease" .Release.Namespace -}}
{{- range .Values.webhook.excludeNamespaces }}{{ $namespaces = append $namespaces . }}{{ end -}}
{{- toJson (uniq $namespaces) -}}
{{- end -}}

{{/* caBundle of a webhook configuration: the provided CA, or (self-signed mode) the one the webhook
     already wrote, so an upgrade does not blank it; cert-manager injects its own. */}}
{{- define "wiproxy.caBundle" -}}
{{- if eq .root.Values.certs.mode "provided" -}}
{{- .root.Values.certs.caBundle -}}
{{- else if eq .root.Values.certs.mode "self-signed" -}}
{{- $existing := lookup "admissionregistration.k8s.io/v1" .kind "" (include "wiproxy.fullname" .root) -}}
{{- if and $existing $existing.webhooks -}}
{{- (index $existing.webhooks 0).clientConfig.caBundle | default "" -}}
{{- end -}}
{{- end -}}
{{- end -}}
