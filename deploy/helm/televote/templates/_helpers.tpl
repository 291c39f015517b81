{{/* A process's DNS-safe name: vote_svc -> vote-svc (also the name in its certificate). */}}
{{- define "televote.dns" -}}{{ . | replace "_" "-" }}{{- end -}}

{{- define "televote.labels" -}}
app.kubernetes.io/name: {{ .name | replace "_" "-" }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/part-of: televote
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ .root.Chart.Name }}-{{ .root.Chart.Version }}
{{- end -}}

{{- define "televote.selector" -}}
app.kubernetes.io/name: {{ .name | replace "_" "-" }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- end -}}

{{- define "televote.image" -}}
{{- if .Values.image.digest -}}
{{ .Values.image.repository }}@{{ .Values.image.digest }}
{{- else -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end -}}
{{- end -}}

{{/* The headless Service that resolves to every ready replica of a process. */}}
{{- define "televote.host" -}}
televote-{{ .name | replace "_" "-" }}.{{ .root.Release.Namespace }}.svc.cluster.local
{{- end -}}

{{- define "televote.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
fsGroup: 10001
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "televote.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 10001
runAsGroup: 10001
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Spread replicas over zones and nodes: one node's or zone's loss takes few of them. */}}
{{- define "televote.spread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: topology.kubernetes.io/zone
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "televote.selector" . | nindent 8 }}
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "televote.selector" . | nindent 8 }}
{{- end -}}

{{/* The mesh certificate of `name`: cert-manager's keys, under the names runtime/mesh.py reads. */}}
{{- define "televote.tlsVolume" -}}
- name: tls
  secret:
    secretName: televote-{{ .name | replace "_" "-" }}-tls
    defaultMode: 0440
    items:
      - { key: tls.crt, path: cert.pem }
      - { key: tls.key, path: key.pem }
      - { key: ca.crt, path: ca.pem }
{{- end -}}
