{{/*
Name prefix of every object: fullnameOverride, else the release name when it contains the
chart name, else "<release>-<chart>". Release "toolgate" gives toolgate-operator.
*/}}
{{- define "toolgate.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 47 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "toolgate.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The operator's Deployment, Service (and the default of several flags). */}}
{{- define "toolgate.operatorName" -}}
{{- printf "%s-operator" (include "toolgate.fullname" .) -}}
{{- end -}}

{{- define "toolgate.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "toolgate.operatorName" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "toolgate.webhookName" -}}
{{- default (include "toolgate.operatorName" .) .Values.webhook.name -}}
{{- end -}}

{{- define "toolgate.tlsSecretName" -}}
{{- default (printf "%s-tls" (include "toolgate.operatorName" .)) .Values.tls.secretName -}}
{{- end -}}

{{- define "toolgate.caConfigMapName" -}}
{{- default (printf "%s-ca" (include "toolgate.fullname" .)) .Values.tls.caConfigMap -}}
{{- end -}}

{{- define "toolgate.leaseName" -}}
{{- printf "%s-leader" (include "toolgate.operatorName" .) -}}
{{- end -}}

{{- define "toolgate.certificateName" -}}
{{- printf "%s-serving" (include "toolgate.operatorName" .) -}}
{{- end -}}

{{- define "toolgate.operatorUrl" -}}
{{- default (printf "https://%s.%s.svc:%d" (include "toolgate.operatorName" .) .Release.Namespace (int .Values.operator.ports.https)) .Values.sidecar.operatorUrl -}}
{{- end -}}

{{/* repository:tag or repository@digest; the tag defaults to appVersion. */}}
{{- define "toolgate.image" -}}
{{- $image := index . 0 -}}
{{- $root := index . 1 -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $image.repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end -}}

{{- define "toolgate.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "toolgate.labels" -}}
helm.sh/chart: {{ include "toolgate.chart" . }}
app.kubernetes.io/name: {{ include "toolgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: toolgate
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "toolgate.operatorSelectorLabels" -}}
app.kubernetes.io/name: {{ include "toolgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "toolgate.operatorLabels" -}}
{{ include "toolgate.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{/* The shared counter store (counters.redis): its objects' name, the Secret the
sidecars read in their own namespace, and the URL they are given. */}}
{{- define "toolgate.counterStoreName" -}}
{{- printf "%s-counter-store" (include "toolgate.fullname" .) -}}
{{- end -}}

{{- define "toolgate.counterStoreSecret" -}}
{{- default (include "toolgate.counterStoreName" .) .Values.counters.redis.existingSecret -}}
{{- end -}}

{{- define "toolgate.counterStoreUrl" -}}
{{- $r := .Values.counters.redis -}}
{{- if and $r.deploy $r.url -}}
{{- fail "counters.redis: set url (an existing store) or deploy: true (the chart runs one), not both" -}}
{{- end -}}
{{- if and $r.deploy $r.tlsCa -}}
{{- fail "counters.redis.tlsCa: the chart's own store (deploy) speaks plain TCP; tlsCa is for a rediss:// url" -}}
{{- end -}}
{{- if $r.deploy -}}
{{- printf "redis://%s.%s.svc:%d" (include "toolgate.counterStoreName" .) .Release.Namespace (int $r.port) -}}
{{- else -}}
{{- $r.url -}}
{{- end -}}
{{- end -}}

{{- define "toolgate.counterStoreSelectorLabels" -}}
app.kubernetes.io/name: {{ include "toolgate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: counter-store
{{- end -}}
