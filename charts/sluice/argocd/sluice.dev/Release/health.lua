-- Argo CD health check for sluice.dev/Release (docs/release.md, "Argo CD").
-- Argo CD runs this with `obj` (the live object) and reads `hs.status` and `hs.message`.
-- Written for Argo CD's Lua (gopher-lua, Lua 5.1) and tested with lua5.4
-- (operator/tests/argocd_health.rs): basic functions and `string` only.
local hs = {}

local function int(n)
  return string.format("%d", n)
end

local function condition(status, type_)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

-- A condition written for an older generation than the live spec says nothing about it.
local function current(c, generation)
  return c ~= nil and (generation == nil or c.observedGeneration == nil
    or c.observedGeneration >= generation)
end

local function first(...)
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    if v ~= nil and v ~= "" then
      return v
    end
  end
  return ""
end

local generation = obj.metadata and obj.metadata.generation
local status = obj.status

if status == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the Sluice operator to report the Release's status"
  return hs
end

local degraded = condition(status, "Degraded")
local ready = condition(status, "Ready")
local progressing = condition(status, "Progressing")

-- A reconcile that panicked reports Degraded for the live generation without moving
-- status.observedGeneration: it counts whatever the rest of the status says.
if degraded ~= nil and degraded.status == "True" and current(degraded, generation)
    and degraded.reason == "ReconcilePanicked" then
  hs.status = "Degraded"
  hs.message = first(degraded.message, status.message, "the operator failed on this Release")
  return hs
end

if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  if status.observedGeneration == nil then
    hs.message = "waiting for the controller to observe generation " .. int(generation)
  else
    hs.message = "waiting for the controller to observe generation " .. int(generation)
      .. " (status is of generation " .. int(status.observedGeneration) .. ")"
  end
  return hs
end

local phase = status.phase
local message = status.message

if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = first(message, degraded and degraded.message, "the Release failed")
  return hs
end

if phase == "Aborted" then
  hs.status = "Degraded"
  local reason = (status.abort and status.abort.reason) or (degraded and degraded.reason) or "Aborted"
  local what = "aborted (" .. reason .. ")"
  if status.abortedRevision ~= nil then
    what = "revision " .. status.abortedRevision .. " " .. what
  end
  if progressing ~= nil and progressing.status == "True" then
    what = what .. ", rolling back"
  end
  hs.message = what .. ": " .. first(message, status.abort and status.abort.message, "")
  return hs
end

-- Paused and Progressing say which step the release is at.
local function at_step(health, default)
  hs.status = health
  hs.message = first(message, default)
  if status.stepDisplay ~= nil then
    hs.message = "step " .. status.stepDisplay .. ": " .. hs.message
  end
  return hs
end

if phase == "Paused" then
  return at_step("Suspended", "paused")
end

if phase == "Progressing" then
  return at_step("Progressing", "progressing")
end

if phase == "Completed" then
  if ready ~= nil and ready.status == "True" and current(ready, generation) then
    hs.status = "Healthy"
    hs.message = first(message, ready.message, "completed")
  else
    hs.status = "Progressing"
    hs.message = "phase Completed but condition Ready is not True yet: " .. first(message, "")
  end
  return hs
end

-- No phase yet, or one this script does not know (a newer operator): the kstatus
-- conditions are the contract every version keeps.
local what
if phase == nil then
  what = "no phase yet"
else
  what = "unknown phase " .. tostring(phase)
end
if degraded ~= nil and degraded.status == "True" and current(degraded, generation) then
  hs.status = "Degraded"
  hs.message = what .. ": " .. first(degraded.message, message, degraded.reason)
elseif ready ~= nil and ready.status == "True" and current(ready, generation)
    and not (progressing ~= nil and progressing.status == "True") then
  hs.status = "Healthy"
  hs.message = what .. ": " .. first(message, ready.message, "Ready")
elseif progressing ~= nil and progressing.status == "True" and current(progressing, generation) then
  hs.status = "Progressing"
  hs.message = what .. ": " .. first(message, progressing.message, "progressing")
elseif phase == nil then
  hs.status = "Progressing"
  hs.message = "waiting for the Sluice operator to set the Release's phase"
else
  hs.status = "Unknown"
  hs.message = what .. " and no condition that tells: " .. first(message, "")
end
return hs
