{{/* The CSI driver name: fixed, it is what fusecsi reports from GetPluginInfo. */}}
{{- define "fusecsi.driverName" -}}csi.fusecsi.io{{- end -}}

{{- define "fusecsi.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "fusecsi.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "fusecsi.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "fusecsi.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "ctx" $ "component" "node"). */}}
{{- define "fusecsi.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fusecsi.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fusecsi.componentLabels" -}}
{{ include "fusecsi.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "fusecsi.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Paths shared by the node plugin and mountd. */}}
{{- define "fusecsi.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) (include "fusecsi.driverName" .) -}}
{{- end -}}

{{- define "fusecsi.mountdSocket" -}}
{{- printf "unix://%s/mountd.sock" (trimSuffix "/" .Values.mountd.socketDir) -}}
{{- end -}}

{{/* Value of --metrics-address for every role. */}}
{{- define "fusecsi.metricsAddress" -}}
{{- printf "0.0.0.0:%d" (int .Values.metrics.port) -}}
{{- end -}}

{{/* The embedded cluster: its token Secret, the master's address, its socket dirs. */}}
{{- define "fusecsi.tokenSecret" -}}
{{- printf "%s-cluster-token" (include "fusecsi.fullname" .) -}}
{{- end -}}

{{- define "fusecsi.masterAddrs" -}}
{{- $c := .Values.cluster -}}
{{- /* <service>.<namespace>: pods resolve it through their DNS search path; short, because the
  address is part of every volume id (at most 128 bytes) */ -}}
{{- printf "%s-master.%s:%d" (include "fusecsi.fullname" .) .Release.Namespace (int $c.masterPort) -}}
{{- end -}}

{{/* Host dirs of co-located workers' sockets that mountd mounts: the values' and the embedded one. */}}
{{- define "fusecsi.workerSocketDirs" -}}
{{- $dirs := .Values.mountd.workerSocketDirs -}}
{{- if .Values.cluster.embedded }}{{ $dirs = append $dirs .Values.cluster.worker.socketDir }}{{ end -}}
{{- toJson (dict "dirs" ($dirs | uniq)) -}}
{{- end -}}

{{/* Every StorageClass of the release: the embedded cluster's first, then storageClasses, each
with `secret` spread over the three per-call references it stands for (an explicit one wins). */}}
{{- define "fusecsi.storageClasses" -}}
{{- $classes := list -}}
{{- if .Values.cluster.embedded -}}
{{- $sc := .Values.cluster.storageClass -}}
{{- $secret := dict "name" (include "fusecsi.tokenSecret" .) "namespace" .Release.Namespace -}}
{{- $classes = append $classes (dict "name" $sc.name "isDefault" $sc.isDefault "masterAddrs" (include "fusecsi.masterAddrs" .) "fsPath" $sc.fsPath "reclaimPolicy" $sc.reclaimPolicy "provisionerSecret" $secret "controllerExpandSecret" $secret "nodePublishSecret" $secret) -}}
{{- end -}}
{{- range .Values.storageClasses -}}
{{- $class := deepCopy . -}}
{{- $secret := .secret -}}
{{- if $secret -}}
{{- range $call := list "provisionerSecret" "controllerExpandSecret" "nodePublishSecret" -}}
{{- if not (hasKey $class $call) }}{{ $_ := set $class $call $secret }}{{ end -}}
{{- end -}}
{{- end -}}
{{- $_ := unset $class "secret" -}}
{{- $classes = append $classes $class -}}
{{- end -}}
{{- toJson (dict "items" $classes) -}}
{{- end -}}

{{/* Where a class's cluster is, for people (NOTES): never the JuiceFS metadata URL itself. */}}
{{- define "fusecsi.clusterOf" -}}
{{- $engine := .engine | default "embedded" -}}
{{- if eq $engine "juicefs" -}}
juicefs, metadata URL in Secret {{ .nodePublishSecret.namespace }}/{{ .nodePublishSecret.name }}:{{ .fsPath }}
{{- else if eq $engine "seaweedfs" -}}
seaweedfs {{ .filerAddrs }}:{{ .fsPath }}
{{- else if eq $engine "curvine" -}}
curvine {{ .masterAddrs }}:{{ .fsPath }}
{{- else -}}
{{ .masterAddrs }}:{{ .fsPath }}
{{- end -}}
{{- end -}}

{{/* "true" when the controller holds private FUSE mounts (controller.privateMounts: always, or
auto and a StorageClass of this release uses juicefs), "" otherwise. */}}
{{- define "fusecsi.controllerPrivateMounts" -}}
{{- $mode := .Values.controller.privateMounts | default "auto" -}}
{{- $on := eq $mode "always" -}}
{{- if eq $mode "auto" -}}
{{- range (include "fusecsi.storageClasses" . | fromJson).items -}}
{{- if eq (.engine | default "") "juicefs" }}{{ $on = true }}{{ end -}}
{{- end -}}
{{- end -}}
{{- if $on }}true{{ end -}}
{{- end -}}

{{/* Secrets the controller's sidecars read: from the StorageClasses and extraControllerSecrets. */}}
{{- define "fusecsi.controllerSecrets" -}}
{{- $refs := list -}}
{{- range (include "fusecsi.storageClasses" . | fromJson).items -}}
{{- with .provisionerSecret }}{{ $refs = append $refs (dict "name" .name "namespace" .namespace) }}{{ end -}}
{{- with .controllerExpandSecret }}{{ $refs = append $refs (dict "name" .name "namespace" .namespace) }}{{ end -}}
{{- end -}}
{{- range .Values.extraControllerSecrets -}}
{{- $refs = append $refs (dict "name" .name "namespace" .namespace) -}}
{{- end -}}
{{- toJson (dict "refs" ($refs | uniq)) -}}
{{- end -}}
