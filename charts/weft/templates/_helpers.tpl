{{/* Labels every object carries; `component` is controller or agent. */}}
{{- define "weft.labels" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/part-of: weft
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}

{{/* The selector of one component's pods. */}}
{{- define "weft.selector" -}}
app.kubernetes.io/name: weft
app.kubernetes.io/component: {{ . }}
{{- end }}

{{- define "weft.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The namespace of the controller's Lease. */}}
{{- define "weft.leaseNamespace" -}}
{{ .Values.controller.leaseNamespace | default .Release.Namespace }}
{{- end }}

{{/* The port of a host:port listen address ("0.0.0.0:9465", "[::]:9465"). */}}
{{- define "weft.port" -}}
{{ splitList ":" . | last | int }}
{{- end }}

{{/*
Changing the ConfigMap restarts the pods that read it: the config is read
once, at start.
*/}}
{{- define "weft.configChecksum" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}
