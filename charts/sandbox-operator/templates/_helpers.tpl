{{- define "sandbox-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sandbox-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sandbox-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "sandbox-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "sandbox-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sandbox-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sandbox-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sandbox-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Leader election: on when asked, and always with more than one replica. */}}
{{- define "sandbox-operator.leaderElect" -}}
{{- if or .Values.leaderElection.enabled (gt (int .Values.replicaCount) 1) }}true{{ end }}
{{- end }}

{{- define "sandbox-operator.leaseNamespace" -}}
{{- default .Release.Namespace .Values.leaderElection.leaseNamespace }}
{{- end }}

{{/* The data volume's claim: an existing one, or the chart's. */}}
{{- define "sandbox-operator.claimName" -}}
{{- default (printf "%s-data" (include "sandbox-operator.fullname" .)) .Values.persistence.existingClaim }}
{{- end }}

{{/* The --config file: values.config, with the webhook's secretFile pointing at the mounted
     Secret when webhook.secretRef is set. */}}
{{- define "sandbox-operator.config" -}}
{{- $cfg := deepCopy .Values.config }}
{{- if .Values.webhook.secretRef.name }}
{{- if not $cfg.webhook }}
{{- fail "webhook.secretRef needs config.webhook (its environments): the secret is for the CI webhook" }}
{{- end }}
{{- if or $cfg.webhook.secretRef $cfg.webhook.secretFile }}
{{- fail "set the webhook's secret once: webhook.secretRef, or config.webhook.secretRef/secretFile, not both" }}
{{- end }}
{{- $_ := set $cfg.webhook "secretFile" "/etc/sandbox-operator-webhook/hmac" }}
{{- end }}
{{- toYaml $cfg }}
{{- end }}

{{/* Namespaces the CI webhook writes SandboxDeploys and delivery records to. */}}
{{- define "sandbox-operator.webhookNamespaces" -}}
{{- $out := list }}
{{- with .Values.config.webhook }}
{{- range $env, $c := .environments }}
{{- $out = append $out $c.namespace }}
{{- end }}
{{- end }}
{{- $out | uniq | toJson }}
{{- end }}

{{/* The rules of the operator's role (see templates/rbac.yaml). */}}
{{- define "sandbox-operator.controllerRules" }}
  - apiGroups: [fleet.valet.dev]
    resources: [sandboxes]
    verbs: [get, list, watch, patch, create, delete]
  - apiGroups: [fleet.valet.dev]
    resources: [sandboxes/status]
    verbs: [patch]
  - apiGroups: [fleet.valet.dev]
    resources: [sandboxes/finalizers]
    verbs: [update]
  - apiGroups: [fleet.valet.dev]
    resources: [sandboxdeploys]
    verbs: [get, list, watch, create, delete]
  - apiGroups: [fleet.valet.dev]
    resources: [sandboxdeploys/status]
    verbs: [patch]
  - apiGroups: [fleet.valet.dev]
    resources: [sandboxpools]
    verbs: [get, list, watch, patch]
  - apiGroups: [fleet.valet.dev]
    resources: [sandboxpools/status]
    verbs: [patch]
  - apiGroups: [fleet.valet.dev]
    resources: [sandboxpools/finalizers]
    verbs: [update]
  - apiGroups: [fleet.valet.dev]
    resources: [secretbundles]
    verbs: [get, list, watch]
  - apiGroups: [fleet.valet.dev]
    resources: [secretbundles/status]
    verbs: [patch]
  - apiGroups: [""]
    resources: [secrets]
    verbs: [get, list, watch]
  {{- if (.Values.rbac | default dict).bootstrap }}
  - apiGroups: [""]
    resources: [secrets]
    verbs: [create]
  {{- end }}
  - apiGroups: [events.k8s.io]
    resources: [events]
    verbs: [create, patch]
{{- end }}
{{- define "sandbox-operator.webhookRules" }}
  - apiGroups: [fleet.valet.dev]
    resources: [sandboxdeploys]
    verbs: [get, create]
  - apiGroups: [""]
    resources: [configmaps]
    verbs: [create]
  - apiGroups: [""]
    resources: [configmaps]
    resourceNames: [sandbox-operator-webhook-deliveries]
    verbs: [get, update]
{{- end }}

{{/* A PersistentVolumeClaim holds /var/lib/sandbox-operator: only the SQLite ledger needs one. */}}
{{- define "sandbox-operator.persistent" -}}
{{- if and .Values.persistence.enabled (eq .Values.ledger.mode "sqlite") }}true{{ end }}
{{- end }}
